"""A table looked up from per-token indices that the model builds at full length (BERT's position
and token-type buffers, OPT's cumsum positions, ``table[positions]``) is looked up on this rank's
indices: exact against one process's eager run in float64, forward and backward, with no
all-gather of the sequence (the lookup's output sliced after the fact gathered its gradient in
the backward, unwarned) and no warning, on the contiguous and zigzag layouts."""
import pytest

import index_lookup_workers as W
from seqpar_compiler.launch import run_ranks

TOL = 1e-12
FAST = [(name, "zigzag", 16) for name in W.MODELS]
CONTIGUOUS = [(name, "ring", 16) for name in W.MODELS]


@pytest.fixture(scope="module")
def fast():
    return run_ranks(W.run_cases, 2, FAST, timeout=300)


@pytest.fixture(scope="module")
def contiguous():
    return run_ranks(W.run_cases, 2, CONTIGUOUS, timeout=300)


@pytest.mark.parametrize("case", FAST, ids=[c[0] for c in FAST])
def test_lookup_of_full_length_indices_is_exact_and_gathers_nothing(fast, case):
    _check(fast, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", CONTIGUOUS, ids=[c[0] for c in CONTIGUOUS])
def test_lookup_on_the_contiguous_layout_is_exact_and_gathers_nothing(contiguous, case):
    _check(contiguous, case)


def _check(results, case):
    for rank, res in enumerate(results):
        got = res[case]
        assert got["out"] < TOL and got["missing"] == [], (rank, got)
        assert max(got["grads"].values()) < TOL, (rank, got["grads"])
        assert got["warnings"] == [], (rank, got["warnings"])
        assert got["gathers"] == 0, (rank, got["gathers"])
