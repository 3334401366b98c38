"""The real-code tier: transformers architectures from tiny configs (real_model_zoo), one training
step each on 2 ranks against the same step in one process.

A wrong number or a crash fails a test; a model that is exact but not fully sharded passes the
exactness test and is named by the sharding test with its reason. The default run takes a
subset (the architectures whose fixes it pins); the whole list is ``slow`` and is also the
report of ``bench/real_models.py``.
"""
import pytest

import real_model_workers as W
from real_model_zoo import ARCHITECTURES
from seqpar_compiler.launch import run_ranks

pytest.importorskip("transformers")

# exact and sharded end to end, each pinning a fix: OPT's wrapper views its ids before the
# embedding (it ran replicated) and its positions come from a cumsum of a mask of ones, BERT's
# positions and token types from buffers (both looked up at full length and sliced: the
# backward gathered their gradients, unwarned), GPT-2 and Llama as the plain baselines, BLOOM's
# real ALiBi code and its GELU (an elementwise autograd.Function, which was gathered), Mixtral's
# eager experts with its router loss (width = B·S made the experts' gradient buffer gather; the
# norm a graph break cuts off before layer 0's attention ran replicated)
FAST = ["opt", "bert-padded", "gpt2", "llama", "bloom-alibi", "mixtral-eager-aux"]
FULLY_SHARDED = ["llama", "llama-packed", "mistral-window", "qwen2", "qwen3", "phi3", "gemma2-softcap-window",
                 "gpt2", "gpt-neox", "opt", "falcon-mqa", "mixtral-grouped_mm", "qwen3-moe-grouped_mm",
                 "deepseek-v3-mla-grouped_mm", "mixtral-eager", "qwen3-moe-eager", "deepseek-v3-mla-eager",
                 "llama4-moe", "llama-padded", "bert-padded", "modernbert-padded", "bloom-alibi", "mpt-alibi",
                 "llama4-moe-chunked", "gemma3-interleaved", "qwen2-moe-shared-eager", "codegen-table-rotary",
                 "mixtral-eager-aux"]


@pytest.fixture(scope="module")
def fast():
    return run_ranks(W.run_real_models, 2, FAST, timeout=600, pg_timeout=300)


@pytest.fixture(scope="module")
def tier():
    return run_ranks(W.run_real_models, 2, list(ARCHITECTURES), timeout=3000, pg_timeout=900)


def _check_exact(results, name):
    for rank, r in enumerate(results):
        rr = r[name]
        assert rr["status"] == "exact", (rank, rr["status"], rr.get("error"), rr.get("loss"), rr.get("logits"),
                                         rr.get("worst_grad"), rr.get("traceback", "")[-1500:])
        assert rr["missing_grads"] == [], rr["missing_grads"]


@pytest.mark.parametrize("name", FAST)
def test_subset_is_exact_and_fully_sharded(fast, name):
    _check_exact(fast, name)
    for r in fast:
        assert r[name]["fully_sharded"], r[name]["fallbacks"]
        assert r[name]["ring_calls"] == 2, r[name]["ring_calls"]
        assert r[name]["gathers"] == 0, r[name]["gathers"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_is_exact(tier, name):
    """Exact or explicitly warned; never a wrong number, never a crash."""
    _check_exact(tier, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", FULLY_SHARDED)
def test_listed_architectures_are_fully_sharded(tier, name):
    for r in tier:
        assert r[name]["fully_sharded"], r[name]["fallbacks"]
        assert r[name]["gathers"] == 0, r[name]["gathers"]
