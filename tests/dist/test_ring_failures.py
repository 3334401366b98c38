"""Ranks that disagree or fail mid-ring give a clear error on every survivor, never a hang."""
import ring_workers as W
from seqpar_compiler.launch import run_ranks


def test_ranks_that_disagree_all_get_an_error_naming_the_field():
    res = run_ranks(W.disagreement_cases, 2, timeout=120)
    for r, errors in enumerate(res):
        assert "q_shape" in errors["shape"], (r, errors["shape"])
        assert "causal" in errors["causal"], (r, errors["causal"])
        assert "schedule" in errors["schedule"], (r, errors["schedule"])
        assert "disagree" in errors["schedule"]
        assert errors["after"] is True


def _check_survivors(res, pg_timeout):
    for rank in (0, 2):
        status, value = res[rank]
        assert status == "ok", value
        assert value["error"] is not None, f"rank {rank} finished although rank 1 failed mid-ring"
        assert "RingCommError" in value["error"] and f"rank {rank} of 3" in value["error"], value["error"]
        assert value["seconds"] < pg_timeout + 10, value


def test_survivor_raises_when_a_peer_dies_mid_forward():
    res = run_ranks(W.fault_case, 3, "exit", timeout=120, pg_timeout=20, allow_failures=True)
    assert res[1][0] == "died"
    _check_survivors(res, 20)


def test_survivor_raises_when_a_peer_raises_mid_forward():
    res = run_ranks(W.fault_case, 3, "raise", timeout=120, pg_timeout=20, allow_failures=True)
    assert res[1][0] == "ok" and "injected failure" in res[1][1]["error"]
    _check_survivors(res, 20)


def test_ring_runs_on_sequence_subgroups_of_a_larger_world():
    errs = run_ranks(W.subgroup_case, 4, timeout=200)
    assert max(errs) <= 1e-5, errs
