"""The follow-up attention idioms (``idioms_attention_more.py``) on 2 gloo ranks, as the corpus
runs its own (``idiom_corpus.check_idiom_result``: exact against single-process eager — for
flex_attention, against the same attention through SDPA with an explicit mask on the same
weights, see ``flex_modules.py`` — the ring ran once per layer on every rank, no fallback
warning or exactly the declared one). One spawn per group (flex; ALiBi + MultiheadAttention)."""
import pytest

import idiom_corpus as corpus
import idioms_attention_more as more
from seqpar_compiler.launch import run_ranks

_RESULTS: dict = {}


def _results(group):
    if group not in _RESULTS:
        _RESULTS[group] = run_ranks(more.run_more_idioms, 2, more.GROUPS[group], timeout=1200, pg_timeout=900)
    return _RESULTS[group]


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("group,name", [(g, n) for g, names in more.GROUPS.items() for n in names])
def test_idiom_is_exact_and_runs_as_ring_attention_without_fallback(group, name):
    for rank, res in enumerate(_results(group)):
        corpus.check_idiom_result(corpus.IDIOMS[name], res[name], rank)


def test_the_groups_hold_the_follow_up_idioms():
    assert len(more.GROUPS["flex"]) == 8 and len(more.GROUPS["alibi-mha"]) == 7, more.GROUPS
