"""MoE routing runs on each rank's own tokens (2 and 4 ranks, aot_eager): a sort over the
(token, slot) entries, rows picked by its indices, a grouped matmul with this rank's counts as
offsets, and the inverse permutation are computed locally and exactly; routing that depends on
the global order (a capacity limit) keeps the gather, warned, and stays exact."""
import pytest

import token_local_workers as W
from seqpar_compiler.launch import run_ranks

pytest.importorskip("transformers")
LOCAL = ["SortGroupedInverseByArange", "ArgsortGroupedInverseByArgsort"]


@pytest.fixture(scope="module")
def p2():
    return run_ranks(W.run_cases, 2, list(W.CASES), timeout=600)


@pytest.fixture(scope="module")
def p4():
    return run_ranks(W.run_cases, 4, LOCAL[:1], timeout=600)


@pytest.mark.parametrize("name", list(W.CASES))
def test_routing_matches_one_process(p2, name):
    for rank, r in enumerate(p2):
        worst = max(r[name]["grads"].items(), key=lambda kv: kv[1])
        assert r[name]["loss"] <= 1e-5 and worst[1] <= 1e-4, (rank, r[name]["loss"], worst)
        assert r[name]["ring_calls"] == 1


@pytest.mark.parametrize("name", LOCAL)
def test_per_token_routing_runs_on_each_ranks_tokens_without_a_gather(p2, name):
    for r in p2:
        assert r[name]["warnings"] == [], r[name]["warnings"]


def test_routing_that_depends_on_the_global_order_is_gathered_and_warned(p2):
    warned = p2[0]["CapacityLimited"]["warnings"]
    assert any("cannot run on each rank's own tokens" in w for w in warned), warned


def test_per_token_routing_on_four_ranks(p4):
    for r in p4:
        rr = r[LOCAL[0]]
        assert rr["loss"] <= 1e-5 and max(rr["grads"].values()) <= 1e-4 and rr["warnings"] == []
