"""ALiBi written before the scale and through ``baddbmm`` with alpha/beta (issue 12).

Shared by ``tests/unit/test_attention_forms.py`` and the idiom corpus. Each maps x [B, S, C]
to [B, S, C] with one causal self-attention whose scores carry an ALiBi bias; what the ring
must carry is ``slopes_h · s_total`` where ``s_total`` is whatever scales the bias on its way
to the softmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attention_modules import _QKV, alibi_slopes

__all__ = ["AlibiBeforeScale", "BaddbmmAlibi"]


class AlibiBeforeScale(_QKV):
    """``softmax((q kᵀ + slope_h · (j − i)) · s + causal)``: the bias is added to the raw
    scores and scaled with them (the ring's slopes are ``slope_h · s``)."""

    def __init__(self, width=32, heads=4):
        super().__init__(width, heads)
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    def forward(self, x):
        q, k, v = self.heads(x)
        s = q.shape[-2]
        i = torch.arange(s, device=x.device)
        bias = self.slopes[:, None, None] * (i[None, :] - i[:, None])            # [H, S, S]
        scores = (q @ k.transpose(-2, -1) + bias) * self.d ** -0.5
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        return self.out(F.softmax(scores, dim=-1) @ v)


class BaddbmmAlibi(_QKV):
    """Bloom: a key-only ALiBi [B·H, 1, S] as ``baddbmm``'s input, ``beta`` on it and ``alpha``
    (1/√d) on q kᵀ, in the method form with keywords (``alibi.baddbmm(batch1=q, batch2=kᵀ,
    beta=β, alpha=α)``) or the function form with positional q/k; then a causal ``finfo.min``
    additive mask on the [B, H, S, S] view. The ring's slopes are ``slope_h · β``."""

    def __init__(self, width=32, heads=4, beta=0.5, keywords=True):
        super().__init__(width, heads)
        self.beta, self.keywords = beta, keywords
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    def forward(self, x):
        q, k, v = self.heads(x)
        b, h, s, d = q.shape
        pos = torch.arange(s, device=x.device)
        alibi = (self.slopes[:, None] * pos[None, :]).repeat(b, 1)[:, None, :]      # [B·H, 1, S]
        q3, k3 = q.reshape(b * h, s, d), k.reshape(b * h, s, d)
        if self.keywords:
            scores = alibi.baddbmm(batch1=q3, batch2=k3.transpose(1, 2), beta=self.beta, alpha=d ** -0.5)
        else:
            scores = torch.baddbmm(alibi, q3, k3.transpose(1, 2), beta=self.beta, alpha=d ** -0.5)
        scores = scores.view(b, h, s, s)
        causal = torch.full((s, s), torch.finfo(q.dtype).min, dtype=q.dtype, device=x.device).triu(1)
        probs = F.softmax(scores + causal, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.out(probs @ v)
