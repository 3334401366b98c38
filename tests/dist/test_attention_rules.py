"""The attention sharding rule on 2 gloo ranks (issue 12): the canonical node with ALiBi slopes,
a softcap and a value head dim other than the query's becomes the ring op, exact against
single-process eager; slopes that need a gradient are a warned exact fallback; a traced
dropout_p that is provably 0 shards, one that is not is a clear error. One spawn for all."""
import pytest

import attention_rule_workers as W
from seqpar_compiler.launch import run_ranks

SHARDED = ["alibi-causal", "alibi-softcap-dv12-striped", "alibi-bidirectional", "softcap-window-distflash",
           "sdpa-dv12", "sdpa-dropout-traced-zero"]


@pytest.fixture(scope="module")
def res():
    return run_ranks(W.rule_cases, 2, timeout=400)


@pytest.mark.parametrize("name", SHARDED)
def test_attention_runs_as_the_ring_once_per_rank_exactly_without_fallback(res, name):
    for r in res:
        case = r[name]
        assert case["error"] is None, case["error"]
        print(f"{name}: ||out-ref||/||ref||={case['out']:.1e}, max grad err {max(case['grads'].values()):.1e}")
        assert case["ring_calls"] == 1, case
        assert not case["warnings"], case["warnings"]
        assert case["out"] < 1e-5 and max(case["grads"].values()) < 1e-4, case


def test_alibi_slopes_that_require_grad_fall_back_exactly_with_a_warning(res):
    for rank, r in enumerate(res):
        case = r["slopes-with-grad"]
        assert case["error"] is None, case["error"]
        assert case["ring_calls"] == 0
        said = [w for w in case["warnings"] if "ALiBi slopes that require grad" in w]
        assert len(said) == (1 if rank == 0 else 0), case["warnings"]     # once per group, by rank 0
        assert case["out"] < 1e-5 and max(case["grads"].values()) < 1e-4, case


def test_traced_dropout_that_is_not_provably_zero_is_a_clear_error(res):
    for r in res:
        err = r["sdpa-dropout-traced-nonzero"]["error"]
        assert err is not None and "attention dropout p=0.1" in err and "use dropout_p=0" in err, err
