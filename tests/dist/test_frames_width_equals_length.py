"""A block whose width equals the sequence length still runs the ring (issue 13 follow-up).

Why: under per-block compile (and FSDP2) the first block receives the eager root's hidden states
``[B, S, C]``; with ``C == S`` (the bench's S=256, width 256 smoke) the frame's entry shard used
to refuse an input with two dims of length S, so the block's attention ran replicated (the ring
never ran, one "runs replicated" warning). The backend shards user inputs at dim 1 when it has
length S; the frame's entry now follows that ``[B, S, ...]`` convention too. One layer, 2 gloo
ranks, ``aot_eager``, one shared spawn: exact against single-process eager, the ring once per
layer on every rank, no gather and no warning.
"""
import pytest

import frames_workers as W
from seqpar_compiler.launch import run_ranks

CASES = [(a, "frames", dict(model="llama-width-s", arrangement=a, schedule="zigzag"))
         for a in ("per-block", "fsdp-per-block")]


@pytest.fixture(scope="module")
def results():
    return run_ranks(W.run_cases, 2, CASES, timeout=900, pg_timeout=600)


@pytest.mark.timeout(1000)
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_width_equal_to_length_runs_the_ring_once_per_layer_exactly(results, name):
    for res in results:
        r = res[name]
        worst = max(r["grads"].values())
        assert r["ring_calls"] == r["layers"] == 1, r
        assert r["loss"] <= 1e-5 and r["logits"] <= 1e-5 and worst <= 1e-4, (r["loss"], r["logits"], worst)
        assert r["gathers"] == 0, r
        assert not [w for w in r["warnings"] if "replicated" in w or "gather" in w], r["warnings"]
