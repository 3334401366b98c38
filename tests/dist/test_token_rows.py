"""Eager MoE routing runs on each rank's own tokens (2 ranks, float64, no compiler): the token
lists of transformers' eager experts loop (``torch.where`` of a shard) are this rank's rows,
every op of the loop and its backward runs on them locally, a router's aux loss sums over the
group, and routing that depends on the one-process order (a capacity limit) is gathered,
warned, and still exact."""
import pytest

import token_rows_workers as W
from seqpar_compiler.launch import run_ranks


@pytest.fixture(scope="module")
def res():
    return run_ranks(W.run_cases, 2, list(W.CASES), timeout=180)


@pytest.mark.parametrize("name", list(W.CASES))
def test_forward_and_every_gradient_match_one_process_in_float64(res, name):
    for rank, r in enumerate(res):
        worst = max(r[name]["errors"].items(), key=lambda kv: kv[1])
        assert worst[1] <= 1e-12, (rank, r[name]["errors"])


@pytest.mark.parametrize("name", ["eager_experts", "eager_experts_aux_loss", "eager_experts_width_is_token_count"])
def test_token_lists_are_each_ranks_own_rows_without_a_gather(res, name):
    for r in res:
        assert r[name]["token_types"] == ["TokenRows"], r[name]["token_types"]
        assert r[name]["warnings"] == [], r[name]["warnings"]


def test_routing_that_depends_on_the_one_process_order_is_gathered_and_warned(res):
    warned = res[0]["capacity_limited"]["warnings"]
    assert any("token-local rows" in w for w in warned), warned
