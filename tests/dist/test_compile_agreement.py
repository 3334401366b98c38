"""No crash where plain torch.compile works: a seqpar stage that raises on one rank only makes
every rank of the group run the frame replicated (exact, warned once by rank 0 with "please
report"), or, under SEQPAR_FALLBACK=error, raise on every rank; nothing hangs.

One 2-rank spawn (aot_eager, a 1-layer GPT, S=16) runs the default cases: a failure injected at
the end of a stage (the graph already changed by it) on group rank 1 for the graph passes and the
backward's compile, the same before SCHEDULE=auto's broadcast (the collective a failed rank never
reaches), and the error mode; a ``slow`` spawn covers every other stage of the backend's diagram
and the failure on rank 0.
"""
import pytest

from compile_agreement_workers import STAGES, run_fault_cases
from seqpar_compiler.launch import run_ranks

DEFAULT_STAGES = ["canonicalize", "inner backward"]      # the error mode fails in the rewrite
SLOW_STAGES = [s for s in STAGES if s not in DEFAULT_STAGES]


def _auto(rank):
    return (f"auto schedule, rank {rank} fails before the broadcast",
            dict(stage="canonicalize", fail_rank=rank, schedule="auto", profile="h100-dgx"))


CASES = ([("no failure", dict(stage=None))] + [(f"fails in {s}", dict(stage=s)) for s in DEFAULT_STAGES]
         + [_auto(1), ("fallback=error", dict(stage="placements and rewrite", fallback="error"))])
SLOW_CASES = [(f"fails in {s}", dict(stage=s)) for s in SLOW_STAGES] + [_auto(0)]


@pytest.fixture(scope="module")
def results():
    # a short process-group timeout: a rank left waiting in a collective fails the run within it
    return run_ranks(run_fault_cases, 2, CASES, timeout=600, pg_timeout=60)


@pytest.fixture(scope="module")
def slow_results():
    return run_ranks(run_fault_cases, 2, SLOW_CASES, timeout=600, pg_timeout=60)


def _exact(res):
    assert "raised" not in res, res.get("raised")
    assert res["loss"] <= 1e-5 and res["grad"] <= 1e-4, res


def test_without_a_failure_the_frame_is_sharded_and_nothing_is_reported(results):
    for res in results:
        _exact(res["no failure"])
        assert res["no failure"]["ring_calls"] >= 1 and not res["no failure"]["reports"]


def _replicated_everywhere(results, name, stage):
    for res in results:
        _exact(res[name])
        assert res[name]["ring_calls"] == 0          # every rank fell back, none sharded
    reports = results[0][name]["reports"]
    assert len(reports) == 1 and f"in stage {stage}:" in reports[0] and "InjectedCompileFailure" in reports[0]
    assert not results[1][name]["reports"]           # said once, by the group's rank 0
    return reports[0]


@pytest.mark.parametrize("stage", DEFAULT_STAGES)
def test_a_stage_failing_on_one_rank_runs_the_frame_replicated_on_every_rank(results, stage):
    assert "group rank(s) [1]" in _replicated_everywhere(results, f"fails in {stage}", stage)


@pytest.mark.slow
@pytest.mark.parametrize("stage", SLOW_STAGES)
def test_every_other_stage_failing_on_one_rank_runs_the_frame_replicated(slow_results, stage):
    assert "group rank(s) [1]" in _replicated_everywhere(slow_results, f"fails in {stage}", stage)


def test_a_failure_before_a_compile_time_collective_is_agreed_at_that_collective(results):
    _replicated_everywhere(results, _auto(1)[0], "canonicalize")


@pytest.mark.slow
def test_a_failure_on_rank_0_before_a_compile_time_collective_is_agreed_too(slow_results):
    assert "group rank(s) [0]" in _replicated_everywhere(slow_results, _auto(0)[0], "canonicalize")


def test_fallback_error_raises_on_every_rank(results):
    failing, other = results[1]["fallback=error"], results[0]["fallback=error"]
    assert "InjectedCompileFailure" in failing["raised"]
    assert "SeqparCompileError" in other["raised"] and "group rank(s) [1]" in other["raised"]
