"""An HF Llama with a graph break inside its decoder stack, 2 and 4 ranks, ``aot_eager``
(issue 13): the mask is built by ``create_causal_mask`` in a frame of its own and reaches the
decoder layers as proved facts (``ProvedMask``), never as an S×S tensor to re-prove.

Slow cases here (the fast one, sdpa with ``torch._dynamo.graph_break()``, is in
``test_mask_frames.py``): eager attention (a float mask) with a printing hook, packed documents
from position ids that restart (the mask's document ids cross the break), and 4 ranks. Each:
loss and every gradient against eager (1e-5 / 1e-4), ring attention once per layer, no sequence
all-gather but the exit one, nothing of full length saved, no seqpar warning.
"""
import pytest

import hf_break_workers as W
from seqpar_compiler.launch import run_ranks

pytest.importorskip("transformers")


CASES = [("eager-print", dict(impl="eager", kind="print")),
         ("sdpa-packed", dict(kind="graph_break", packed=True))]


@pytest.fixture(scope="module")
def res():
    return run_ranks(W.run_cases, 2, CASES, timeout=600, pg_timeout=300)


@pytest.fixture(scope="module")
def res4():
    return run_ranks(W.run_cases, 4, [("sdpa-4", dict(kind="graph_break"))], timeout=600, pg_timeout=300)


def _check(rr):
    assert rr["loss"] <= 1e-5 and rr["logits"] <= 1e-5, rr
    assert max(rr["grads"].values()) <= 1e-4, rr["grads"]
    assert rr["ring_calls"] == rr["layers"], rr
    assert rr["gathers"] <= 1 and rr["full_saves"] == [] and rr["warnings"] == [], rr


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", [c for c, _ in CASES])
def test_hf_llama_with_a_graph_break_stays_sharded_and_exact(res, case):
    for r in res:
        _check(r[case])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hf_llama_with_a_graph_break_on_4_ranks(res4):
    for r in res4:
        _check(r["sdpa-4"])
