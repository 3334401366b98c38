"""A DiT (patchify, non-causal attention, unpatchify's token grid) on 2 ranks, exact in loss and
every gradient (float64), against one process.

Under a contiguous layout (ring, ulysses) the unpatchify reshape ``[N, T, p·p·c] → [N, h, w, p,
p, c]`` keeps each rank's band of rows sharded, so the whole step runs sharded with no warning;
under zigzag the same view gathers, with a warning naming it; a convolution over H and W after
unpatchify gathers too (its halo rule is another rule's), warned, and stays exact. A graph
break inside unpatchify hands the band of rows to the eager code as a SequenceShard: the rest of
unpatchify and the loss run on it, still sharded."""
import pytest

import token_grid_workers as W
from seqpar_compiler.launch import run_ranks

TOL = 1e-10


# one spawn in the default run (the ring layout, and zigzag's warned gather); the rest slow
DEFAULT = ["ring", "zigzag"]


@pytest.fixture(scope="module")
def res():
    return run_ranks(W.run_dit_cases, 2, DEFAULT, timeout=600, pg_timeout=300)


@pytest.fixture(scope="module")
def res_more():
    return run_ranks(W.run_dit_cases, 2, [n for n in W.CASES if n not in DEFAULT], timeout=600, pg_timeout=300)


def _exact(r):
    assert not r["missing"], r
    assert r["loss"] <= TOL, r
    worst = max(r["grads"].items(), key=lambda kv: kv[1])
    assert worst[1] <= TOL, worst


def test_dit_runs_fully_sharded_under_the_ring_layout(res):
    _fully_sharded(res, "ring")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ulysses", "ring-graph-break-eager-loss"])
def test_dit_runs_fully_sharded_under_ulysses_and_across_a_graph_break(res_more, name):
    _fully_sharded(res_more, name)


def _fully_sharded(res, name):
    for r in res:
        _exact(r[name])
        assert r[name]["warnings"] == [], r[name]["warnings"]
        assert r[name]["ring_calls"] == 2          # once per block (a band crossing a graph break stays one)


def test_dit_under_zigzag_gathers_the_token_grid_with_a_warning_and_stays_exact(res):
    r = res[0]["zigzag"]
    _exact(r)
    assert any("splits the sequence" in w and "no band of rows" in w for w in r["warnings"]), r["warnings"]
    assert r["ring_calls"] == 2


@pytest.mark.slow
def test_a_convolution_after_unpatchify_gathers_with_a_warning_and_stays_exact(res_more):
    r = res_more[0]["ring-refine-conv"]
    _exact(r)
    assert any("cannot shard" in w and "conv" in w for w in r["warnings"]), r["warnings"]
    assert not any("splits the sequence" in w for w in r["warnings"]), r["warnings"]
