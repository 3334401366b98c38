"""An HF Llama with a graph break after its first decoder layer (a forward hook calling
``torch._dynamo.graph_break()``), 2 ranks, ``aot_eager`` (issue 13 follow-up, item 4).

Pinned as not done: today the frame Dynamo resumes after the break (LlamaModel.forward, frame
[14/0]) fails to build its guards (``IndexError`` in ``produce_guards_verbose``: a shape symbol
allocated in ``_reshape_view_helper_core_alg`` has no source), so the call raises on the warm-up
step. When it passes, the spec is: loss and every gradient against eager (1e-5 / 1e-4), ring
attention once per layer, no sequence all-gather between the frames (the mask's facts cross the
break with the shard, never an S×S tensor to re-prove). Slow: one spawn, ~40 s under load.
"""
import pytest

import hf_break_workers as W
from seqpar_compiler.launch import run_ranks

pytest.importorskip("transformers")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.xfail(strict=True, reason="not done: the frame resumed after the break fails in Dynamo's guard "
                   "building (shape symbol without a source)")
def test_hf_llama_with_a_graph_break_is_exact_and_sharded_across_the_break():
    res = run_ranks(W.run_cases, 2, [("gb", dict(kind="graph_break"))], timeout=600, pg_timeout=300)
    for r in res:
        rr = r["gb"]
        assert rr["loss"] <= 1e-5 and rr["logits"] <= 1e-5, rr
        assert max(rr["grads"].values()) <= 1e-4, rr["grads"]
        assert rr["ring_calls"] == rr["layers"], rr
        assert rr["gathers"] <= 1 and not [w for w in rr["warnings"] if "replicated" in w], rr
