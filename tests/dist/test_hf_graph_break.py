"""An HF Llama with a graph break after its first decoder layer (a forward hook calling
``torch._dynamo.graph_break()``), 2 ranks, ``aot_eager`` (issue 13 follow-up, item 4).

Pinned as not done: the call is exact, but the mask is built in its own frame
(``create_causal_mask``, no attention: replicated, warned) and reaches the decoder layers as an
explicit [B, 1, S, S] tensor they cannot prove causal, so every attention is gathered and runs
replicated (warned "cannot shard scaled_dot_product_attention"; measured: 0 ring calls, 9
sequence all-gathers per step, a (3, 1, 48, 48) mask saved for the backward).
When it passes, the spec is: loss and every gradient against eager (1e-5 / 1e-4), ring
attention once per layer, no sequence all-gather between the frames (the mask's facts cross the
break with the shard, never an S×S tensor to re-prove). Slow: one spawn, ~40 s under load.
"""
import pytest

import hf_break_workers as W
from seqpar_compiler.launch import run_ranks

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def res():
    return run_ranks(W.run_cases, 2, [("gb", dict(kind="graph_break"))], timeout=600, pg_timeout=300)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hf_llama_with_a_graph_break_is_exact_and_warns_where_it_gathers(res):
    """Never silently wrong: exact against eager, and every attention it cannot shard is named."""
    for r in res:
        rr = r["gb"]
        assert rr["loss"] <= 1e-5 and rr["logits"] <= 1e-5, rr
        assert max(rr["grads"].values()) <= 1e-4, rr["grads"]
        assert rr["ring_calls"] == rr["layers"] or [w for w in rr["warnings"] if "cannot shard" in w], rr


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.xfail(strict=True, reason="not done: the mask crosses the break as an S x S tensor, not as "
                   "proved facts; attention is gathered (warned), exact")
def test_hf_llama_with_a_graph_break_stays_sharded_across_the_break(res):
    for r in res:
        rr = r["gb"]
        assert rr["ring_calls"] == rr["layers"], rr
        assert rr["gathers"] <= 1 and not [w for w in rr["warnings"] if "replicated" in w], rr
