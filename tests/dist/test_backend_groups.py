"""Backend on 4 gloo ranks: sequence groups, the same-batch check, graphs with nothing to shard."""
import pytest

import backend_workers as W
from seqpar_compiler.launch import run_ranks


@pytest.fixture(scope="module")
def res():
    return run_ranks(W.backend_cases, 4, timeout=300)


def test_degree_groups_are_consecutive_ranks(res):
    assert [r["degree_members"] for r in res] == [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_degree_that_does_not_divide_the_world_is_an_error(res):
    assert all("must divide the world size 4" in r["degree_error"] for r in res)


def test_graph_without_attention_runs_replicated_correctly_and_warns(res):
    """Warned once per group, by its rank 0 (issue 16)."""
    assert all(r["fallback_ok"] for r in res)
    assert [r["fallback_warned"] for r in res] == [True, False, False, False]


def test_different_batches_on_ranks_raise_a_clear_error_on_every_rank(res):
    for r in res:
        assert "passed different inputs" in r["mismatch_error"] and "DistributedSampler" in r["mismatch_error"]


def test_input_check_can_be_turned_off(res):
    assert all(r["unchecked_runs"] for r in res)


def test_graph_without_attention_is_not_an_error_in_strict_fallback_mode(res):
    """SEQPAR_FALLBACK=error refuses gathers of ops that cannot be sharded (tested on models);
    a graph with no attention has none, it simply has nothing to shard."""
    assert all(r["strict_runs"] for r in res)
