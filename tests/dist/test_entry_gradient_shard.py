"""The first frame's entry shard returns its input's gradient as a SequenceShard: eager code
before the frame with no shard rule for that gradient (here an FFT over the sequence) is never
wrong. Under ``SEQPAR_GRAD_REDUCE=sum`` it gathers (warned, naming
the op) and the gradient is exact; under ``none`` it raises, since a gathered gradient would be
whole on every rank where partial ones are promised (a dp x sp sum would count it P times).
2 gloo ranks, float64, one spawn (~15 s).
"""
import pytest

import frames_workers as W
from seqpar_compiler.launch import run_ranks


@pytest.fixture(scope="module")
def results():
    return run_ranks(W.run_entry_gradient_cases, 2, ["sum", "none"], timeout=300)


def test_rule_less_eager_op_on_the_entry_gradient_gathers_warned_and_exact_under_sum(results):
    for res in results:
        r = res["sum"]
        assert r["error"] is None and r["grad"] <= 1e-12, r
    # warned once per group, by its rank 0, naming the FFT's backward
    assert any("aten._fft" in w and "gathering" in w for w in results[0]["sum"]["warnings"]), results[0]["sum"]


def test_rule_less_eager_op_on_the_entry_gradient_is_refused_under_grad_reduce_none(results):
    for res in results:
        r = res["none"]
        assert r["error"] is not None and "SEQPAR_GRAD_REDUCE=none" in r["error"] and "aten._fft" in r["error"], r
