"""Real attention code that the ring carries as per-token, per-head or positional data, on 2 ranks:
padding masks from transformers' ``masking_utils`` (Llama right- and left-padded, BERT, ModernBERT
with its bidirectional local window), the ALiBi code of BLOOM (``baddbmm`` scores, ``bmm``
values) and MPT, x-transformers' ALiBi on only some heads (signed in a decoder, a symmetric
−slope·|j − i| in an encoder: a per-head table of the offset), litgpt's windows (soft-capped with an
in-place ``masked_fill_``; filled row by row in a loop), torchtune's Gemma 2 window on every
other layer and transformers' T5 encoder (a learned bias of bucket(k − q), eager and SDPA: its
weight's gradient summed over blocks and ranks) (faithful models of their attention code: ``library_attention_modules``). Each case: loss, logits and every gradient against single-process eager (fp32: 1e-5 /
1e-4), the ring once per attention layer on every rank, no seqpar warning about attention.

A padding mask hidden by a finite fill (eager attention's ``finfo.min``) is not carried: there a
query whose every key is padding averages all values in eager, which the ring does not do, so
that attention falls back, warned, and stays exact.
"""
import pytest

import attention_form_workers as W
from seqpar_compiler.launch import run_ranks

pytest.importorskip("transformers")

CASES = [
    ("llama-right-sdpa", dict(arch="llama", padding="right")),
    ("llama-left-sdpa", dict(arch="llama", padding="left")),
    ("bert-right", dict(arch="bert", padding="right")),
    ("modernbert-right-local-window", dict(arch="modernbert", padding="right")),
    ("bloom-alibi", dict(arch="bloom")),
    ("mpt-alibi", dict(arch="mpt")),
    ("llama-left-eager", dict(arch="llama", padding="left", impl="eager")),
    ("x-transformers-alibi-2-of-4-heads", dict(arch="xt-decoder-alibi")),
    ("x-transformers-encoder-symmetric-alibi", dict(arch="xt-encoder-alibi")),
    ("t5-encoder-learned-bias-sdpa", dict(arch="t5-encoder")),
    ("t5-encoder-learned-bias-eager-zigzag", dict(arch="t5-encoder-eager", schedule="zigzag")),
    ("litgpt-window-softcap", dict(arch="litgpt-softcap")),
    ("litgpt-window-loop", dict(arch="litgpt-loop")),
    ("torchtune-gemma2-window-some-layers", dict(arch="torchtune-gemma2")),
]
SHARDED = [name for name, _ in CASES if name != "llama-left-eager"]
# the default run: one case per family (padding with empty rows, a local window with padding,
# real ALiBi code, a mask written in place, the finite-fill refusal, a learned bias); the rest are slow
FAST = ["llama-left-sdpa", "modernbert-right-local-window", "mpt-alibi", "litgpt-window-loop", "llama-left-eager",
        "t5-encoder-learned-bias-sdpa"]


def _marked(names):
    return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.fixture(scope="module")
def res(request):
    slow = "not slow" not in (request.config.getoption("markexpr") or "")
    cases = CASES if slow else [c for c in CASES if c[0] in FAST]
    return run_ranks(W.run_attention_forms, 2, cases, timeout=900, pg_timeout=300)


@pytest.mark.parametrize("name", _marked([name for name, _ in CASES]))
def test_real_model_is_exact(res, name):
    for rank, r in enumerate(res):
        rr = r[name]
        assert rr["exact"], (rank, rr.get("error"), rr.get("loss"), rr.get("logits"), rr.get("worst_grad"),
                             rr.get("traceback", "")[-1500:])


# Fallbacks outside attention, warned and exact, named here so any other one fails the test:
# x-transformers caches its S×S ALiBi bias in a buffer inside forward (a frame output computed
# from two aranges, which the rewrite gathers). Its attention is the ring.
OTHER_FALLBACKS = {"x-transformers-alibi-2-of-4-heads": "subtract", "x-transformers-encoder-symmetric-alibi": "subtract"}


@pytest.mark.parametrize("name", _marked(SHARDED))
def test_attention_runs_as_the_ring_once_per_layer_without_fallback(res, name):
    for r in res:
        rr = r[name]
        assert rr["ring_calls"] == rr["layers"], rr
        other = OTHER_FALLBACKS.get(name)
        unexpected = [w for w in rr["warnings"] if other is None or other not in w]
        assert unexpected == [], unexpected


def test_padding_hidden_by_a_finite_fill_falls_back_warned(res):
    """Left padding under eager attention: the padded queries see no key, and eager gives them the
    mean of every value (``finfo.min`` + score rounds to ``finfo.min`` for all keys)."""
    for rank, r in enumerate(res):
        rr = r["llama-left-eager"]
        if rank == 0:
            assert any("finite fill" in w for w in rr["warnings"]), rr["warnings"]


# the default layout (auto: all-to-all for this encoder) and the zigzag ring
LEARNED = ["t5-encoder-learned-bias-sdpa", "t5-encoder-learned-bias-eager-zigzag"]


@pytest.mark.parametrize("name", _marked(LEARNED))
def test_learned_relative_bias_gets_its_gradient_and_saves_no_score_sized_tensor(res, name):
    """T5's bias goes to the attention op as a [H, 2S − 1] table computed from its weight: the
    weight's gradient (summed over blocks and ranks) is eager's, and nothing saved for backward has
    a row of all S keys (the S × S lookup and its scores are gone), on every rank."""
    for r in res:
        assert r[name]["saved_scores"] == [], r[name]["saved_scores"]
        bias = r[name]["learned_bias_grads"]
        assert len(bias) == 1 and max(bias.values()) <= 1e-5, bias
