"""The idiom corpus (issue 12) on 2 gloo ranks: every idiom exact against single-process eager,
its attention run as the ring on every rank, and no fallback warning (or only the warned,
exact fallback the idiom declares). One spawn runs the whole corpus."""
import os

import pytest

import idiom_corpus as corpus
from seqpar_compiler.launch import run_ranks

IDIOMS = corpus.load_idioms()
# IDIOMS_ONLY=a,b runs a subset (development); the suite runs them all
_ONLY = [n for n in os.environ.get("IDIOMS_ONLY", "").split(",") if n]
NAMES = sorted(n for n in IDIOMS if not _ONLY or n in _ONLY)


@pytest.fixture(scope="module")
def results():
    return run_ranks(corpus.run_idioms, 2, NAMES, timeout=1800, pg_timeout=900)


@pytest.mark.parametrize("name", NAMES)
def test_idiom_is_exact_and_runs_as_ring_attention_without_fallback(results, name):
    for rank, res in enumerate(results):
        corpus.check_idiom_result(IDIOMS[name], res[name], rank)


def test_the_corpus_covers_at_least_40_idioms_and_25_op_idioms():
    import idioms_ops
    ops = [n for n, i in IDIOMS.items() if i.build.__module__ == idioms_ops.__name__]
    assert len(IDIOMS) >= 40 and len(ops) >= 25, (len(IDIOMS), len(ops))
