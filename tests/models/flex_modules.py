"""``flex_attention`` modules for the idiom corpus (issue 12), with an SDPA reference.

What runs on CPU: torch refuses ``flex_attention`` on CPU whenever q, k or v requires grad
(``torch.nn.attention.flex_attention._validate_device`` raises NotImplementedError "does not
support backward on CPU"), and Dynamo traces that check too, so on CPU a *training* forward
that calls flex_attention cannot even be captured (the frame falls back to eager, which raises),
whatever the backend. Forward under ``no_grad`` captures and runs (the unit tests do that).
On CUDA there is no such check.

So that the corpus can check the sharded backward on CPU, ``allow_cpu_flex_capture()`` lifts
that check *only while Dynamo traces* (eager flex_attention still refuses): seqpar replaces the
flex_attention call by the ring before anything runs it, so the check guards nothing here.

Eager ``flex_attention`` has no CPU backward to compare with, so each module runs
``flex_attention`` only while Dynamo traces it (``torch.compiler.is_compiling()``) and, in eager,
the *mathematically same* attention through ``F.scaled_dot_product_attention`` with an explicit
boolean mask (and the score_mod written out) on the same weights. The corpus compares the
compiled seqpar run (flex traced, rewritten to the ring) with that eager reference: exactness
then means the rewrite carried exactly the mask and score semantics the mods define. The
reference is written inline in ``forward`` (not a method): were Dynamo to skip ``forward``, no
attention would be compiled at all and the ring-call count would fail the idiom, instead of a
separately compiled reference passing for flex.

Each maps x [B, S, C] (and document data doc [B, S]) to [B, S, C] with one self-attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attention_modules import _QKV, alibi_slopes

__all__ = ["FlexDocAttention", "reference_visible", "allow_cpu_flex_capture"]


def allow_cpu_flex_capture() -> None:
    """Let Dynamo capture ``flex_attention`` on CPU inputs that require grad (see the module
    docstring); eager calls keep torch's check. Idempotent."""
    import torch.nn.attention.flex_attention as flex
    original = flex._validate_device
    if getattr(original, "_seqpar_capture", False):
        return

    def validate(query, key, value):
        if torch.compiler.is_compiling() and query.device.type == "cpu":
            return None
        return original(query, key, value)
    validate._seqpar_capture = True
    validate._original = original
    flex._validate_device = validate


def reference_visible(doc, causal: bool, window: int | None, S: int):
    """The visibility [B, 1, S, S] the mods define, built densely for the eager reference."""
    i = torch.arange(S, device=doc.device if doc is not None else None)
    vis = torch.ones(S, S, dtype=torch.bool, device=i.device)
    if causal:
        vis = vis & (i[:, None] >= i[None, :])
    if window is not None:
        vis = vis & (i[:, None] - i[None, :] < window)
    vis = vis[None, None]
    if doc is not None:
        vis = vis & (doc[:, None, :, None] == doc[:, None, None, :])
    return vis


class FlexDocAttention(_QKV):
    """flex_attention with a mask_mod of ``doc[b, q] == doc[b, kv]`` (``docs``: None for no
    document factor; ``"input"``: the doc tensor passed in; ``"computed"``: numbered from
    restarting position ids as ``(pos == 0).cumsum(-1) - 1``), optionally causal / a window, and
    a score_mod: None, ``"softcap"`` (``cap · tanh(score / cap)``) or ``"alibi"`` (a buffer of
    per-head slopes times ``kv_idx − q_idx``)."""

    def __init__(self, width=32, heads=4, docs="input", causal=True, window=None, score=None, cap=5.0):
        super().__init__(width, heads)
        self.docs, self.causal, self.window, self.score, self.cap = docs, causal, window, score, cap
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    def _doc(self, doc):
        if self.docs == "computed":
            return (doc == 0).cumsum(-1) - 1            # ``doc`` is position ids that restart
        return doc if self.docs == "input" else None

    def forward(self, x, doc):
        q, k, v = self.heads(x)
        doc = self._doc(doc)
        if torch.compiler.is_compiling():
            return self.out(self._flex(q, k, v, doc))
        S = q.shape[-2]                                  # the eager reference, inline (see above)
        vis = reference_visible(doc, self.causal, self.window, S)
        if self.score is None:
            return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=vis))
        s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if self.score == "softcap":
            s = self.cap * torch.tanh(s / self.cap)
        else:
            i = torch.arange(S, device=q.device)
            s = s + self.slopes[:, None, None] * (i[None, :] - i[:, None])
        return self.out(torch.softmax(s.masked_fill(~vis, float("-inf")), -1) @ v)

    def _flex(self, q, k, v, doc):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        causal, window, cap, score, slopes = self.causal, self.window, self.cap, self.score, self.slopes

        def mask_mod(b, h, q_idx, kv_idx):
            visible = q_idx >= 0
            if doc is not None:
                visible = doc[b, q_idx] == doc[b, kv_idx]
            if causal:
                visible = visible & (q_idx >= kv_idx)
            if window is not None:
                visible = visible & (q_idx - kv_idx < window)
            return visible

        def score_mod(s, b, h, q_idx, kv_idx):
            if score == "softcap":
                return cap * torch.tanh(s / cap)
            if score == "alibi":
                return s + slopes[h] * (kv_idx - q_idx)
            return s
        S = q.shape[-2]
        block_mask = create_block_mask(mask_mod, q.shape[0], None, S, S, device=str(q.device))
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
