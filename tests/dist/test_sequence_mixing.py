"""Convolutions over time, rolls, flips and scans along the sequence: exact against one process's
eager run in float64, forward and backward, compiled (``aot_eager``) and eager on SequenceShards,
on the contiguous and zigzag layouts, with no gather of the sequence (no fallback warning, no
all-gather of it) and, compiled, nothing full-length saved for the backward.

One spawn per group size shares every case (``sequence_mixing_workers.run_cases``); the default
run takes a few cases on 2 ranks, the full grid on 2 and 4 ranks is ``slow``."""
import pytest

import sequence_mixing_workers as W
from seqpar_compiler.launch import run_ranks

TOL = 1e-12
SCHEDULES = ("ring", "zigzag")
FAST = [("compiled", "causal_conv_slice_depthwise", "zigzag"), ("compiled", "causal_conv_pad_dense", "ring"),
        ("compiled", "cumsum", "zigzag"), ("eager", "cumsum", "zigzag"), ("eager", "roll_backward", "ring"),
        ("eager", "same_conv", "zigzag")]
# eager backward ops seqpar has no rule for: ATen's cumprod_backward finds each row's first zero
# with max/gather/scatter along the sequence (exact, gathered with a warning; compiled, the
# backward is autograd's through the sharded scan)
EAGER_GATHERED_BACKWARD = {"cumprod": ("aten.max.dim", "aten.scatter_.value", "aten.gather.default")}


def _grid(P):
    return [(kind, name, schedule, 8 * P) for kind in ("compiled", "eager") for name in W.MIXERS
            for schedule in SCHEDULES if kind == "compiled" or name in W.EAGER_OPS] + STRIPED + HYBRID.get(P, [])


# the hybrid layout (Ulysses inside groups of 2, zigzag across them) on 4 ranks: each rank holds one run
HYBRID = {4: [("compiled", name, "hybrid", 32) for name in ("causal_conv_slice_depthwise", "cumsum", "roll_forward")]}
# on striped a rank's tokens are not runs: a convolution or a scan gathers, warned, and stays exact
STRIPED = [("compiled", "causal_conv_slice_depthwise", "striped", 16), ("compiled", "cumsum", "striped", 16),
           ("eager", "cumsum", "striped", 16)]


@pytest.fixture(scope="module")
def fast():
    return run_ranks(W.run_cases, 2, [(k, n, s, 16) for k, n, s in FAST], timeout=300)


@pytest.fixture(scope="module")
def grid2():
    return run_ranks(W.run_cases, 2, _grid(2), timeout=900)


@pytest.fixture(scope="module")
def grid4():
    return run_ranks(W.run_cases, 4, _grid(4), timeout=1500, pg_timeout=300)


def _check(results, case):
    kind, name = case[0], case[1]
    if case in STRIPED:
        return _check_gathered(results, case)
    for rank, res in enumerate(results):
        got = res[case]
        assert "error" not in got, f"rank {rank}: {got}"
        assert got["out"] < TOL and got["grad"] < TOL, f"rank {rank} {case}: {got}"
        if kind == "eager":
            assert got["sharded"], f"{case}: the result is not a SequenceShard"
        else:       # the step gathers no sequence and saves nothing full-length for its backward
            assert got["sequence_gathers"] == 0 and got["full_length_saves"] == [], f"rank {rank} {case}: {got}"
    warnings = results[0][case]["warnings"]
    allowed = EAGER_GATHERED_BACKWARD.get(name) if kind == "eager" else None
    unexpected = [w for w in warnings if allowed is None or not any(op in w for op in allowed)]
    assert not unexpected, f"{case} gathered: {unexpected}"
    if kind == "eager" and allowed is None:
        assert all(r[case]["gathers"] == 0 for r in results), f"{case} gathered the sequence"


def _check_gathered(results, case):
    for rank, res in enumerate(results):
        got = res[case]
        assert "error" not in got and got["out"] < TOL and got["grad"] < TOL, f"rank {rank} {case}: {got}"
    assert results[0][case]["warnings"], f"{case}: gathered without a warning"


@pytest.mark.parametrize("case", FAST, ids=["-".join(c) for c in FAST])
def test_mixing_op_is_exact_without_gathering_on_2_ranks(fast, case):
    _check(fast, (*case, 16))


@pytest.mark.slow
@pytest.mark.timeout(1500)     # the first case waits for the whole grid's spawn
@pytest.mark.parametrize("case", _grid(2), ids=lambda c: "-".join(map(str, c)))
def test_every_mixing_op_is_exact_on_2_ranks(grid2, case):
    _check(grid2, case)


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("case", _grid(4), ids=lambda c: "-".join(map(str, c)))
def test_every_mixing_op_is_exact_on_4_ranks(grid4, case):
    _check(grid4, case)
