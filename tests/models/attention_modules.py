"""Tiny attention modules written the ways real codebases write attention (issue 12).

Shared by the unit tests of the canonicalisation (``tests/unit/test_attention_forms.py``) and
the idiom corpus (``idioms_attention.py``). Each module maps x [B, S, C] to [B, S, C] with one
self-attention. Written for seqpar, in the style of the codebase each docstring names.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["alibi_slopes", "EinsumAttention", "BaddbmmAttention", "AlibiAttention", "SoftcapAttention",
           "MHAAttention", "EncoderLayerAttention", "SDPAWindowGQA", "SDPALowerRight", "ValueDimAttention",
           "AdditiveBiasAttention", "PairBiasAttention", "FlexAttention"]


def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi paper's geometric slopes 2^(-8 h / H), h = 1..H (heads a power of two)."""
    return torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)])


class _QKV(nn.Module):
    def __init__(self, width, heads, kv_heads=None, v_dim=None):
        super().__init__()
        self.h, self.hkv = heads, kv_heads or heads
        self.d = width // heads
        self.dv = v_dim or self.d
        self.q = nn.Linear(width, heads * self.d)
        # no key bias: q·b_k is the same for every key of a row, so softmax ignores it and its
        # gradient is zero up to rounding (a relative comparison of it would compare noise)
        self.k = nn.Linear(width, self.hkv * self.d, bias=False)
        self.v = nn.Linear(width, self.hkv * self.dv)
        self.o = nn.Linear(heads * self.dv, width)

    def heads(self, x):
        """q [B, H, S, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv]."""
        b, s, _ = x.shape
        return (self.q(x).view(b, s, self.h, self.d).transpose(1, 2),
                self.k(x).view(b, s, self.hkv, self.d).transpose(1, 2),
                self.v(x).view(b, s, self.hkv, self.dv).transpose(1, 2))

    def out(self, y):
        b, h, s, dv = y.shape
        return self.o(y.transpose(1, 2).reshape(b, s, h * dv))


class EinsumAttention(nn.Module):
    """x-transformers: einops ``rearrange``, ``einsum`` scores, ``masked_fill(-finfo.max)`` of a
    causal ``triu`` (and optionally a sliding window from ``arange``); ``layout="bshd"`` keeps
    q/k/v as [B, S, H, D] and writes the einsums for it."""

    def __init__(self, width=32, heads=4, window=None, layout="bhsd"):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.o = nn.Linear(width, width)
        self.h, self.window, self.layout = heads, window, layout
        self.scale = (width // heads) ** -0.5

    def forward(self, x):
        from einops import rearrange
        if self.layout == "bhsd":
            q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.h)
            sim = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
        else:
            q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b n h d", three=3, h=self.h)
            sim = torch.einsum("bihd,bjhd->bhij", q, k) * self.scale
        i, j = sim.shape[-2:]
        mask = torch.ones((i, j), dtype=torch.bool, device=x.device).triu(j - i + 1)
        if self.window is not None:
            pos = torch.arange(j, device=x.device)
            mask = mask | ((pos[:, None] - pos[None, :]) >= self.window)
        sim = sim.masked_fill(mask, -torch.finfo(sim.dtype).max)
        attn = sim.softmax(dim=-1)
        if self.layout == "bhsd":
            out = rearrange(torch.einsum("bhij,bhjd->bhid", attn, v), "b h n d -> b n (h d)")
        else:
            out = rearrange(torch.einsum("bhij,bjhd->bihd", attn, v), "b n h d -> b n (h d)")
        return self.o(out)


class BaddbmmAttention(_QKV):
    """GPT-NeoX: scores by ``baddbmm`` on [B·H, S, D] into zeros with ``alpha`` = 1/√D, a causal
    ``tril`` buffer applied by ``torch.where`` with ``finfo.min`` as a tensor."""

    def __init__(self, width=32, heads=4, max_len=64):
        super().__init__(width, heads)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool))[None, None],
                             persistent=False)

    def forward(self, x):
        q, k, v = self.heads(x)
        b, h, s, d = q.shape
        scores = torch.zeros(b * h, s, s, dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(scores, q.reshape(b * h, s, d), k.reshape(b * h, s, d).transpose(1, 2),
                               beta=1.0, alpha=1.0 / math.sqrt(d))
        scores = scores.view(b, h, s, s)
        mask_value = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype, device=scores.device)
        scores = torch.where(self.bias[:, :, :s, :s], scores, mask_value)
        return self.out(torch.matmul(F.softmax(scores, dim=-1), v))


class AlibiAttention(_QKV):
    """ALiBi. ``form="signed"``: ``slope_h · (k_pos − q_pos)`` added, then a causal
    ``masked_fill(-inf)`` (the paper); ``form="mpt"``: MPT's key-only ``slope_h · (k − S + 1)``
    folded with the causal mask into one additive float mask passed to SDPA;
    ``form="bidirectional"``: the signed form with no mask at all."""

    def __init__(self, width=32, heads=4, form="signed"):
        super().__init__(width, heads)
        self.form = form
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    def forward(self, x):
        q, k, v = self.heads(x)
        s = q.shape[-2]
        pos = torch.arange(s, device=x.device)
        if self.form == "mpt":
            bias = self.slopes.view(1, -1, 1, 1) * torch.arange(1 - s, 1, device=x.device).view(1, 1, 1, s)
            causal = torch.full((s, s), float("-inf"), device=x.device).triu(1)
            mask = (bias + causal).to(q.dtype)
            return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        scores = scores + self.slopes.view(-1, 1, 1) * (pos[None, :] - pos[:, None])
        if self.form == "signed":
            scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        return self.out(torch.softmax(scores, -1) @ v)


class AdditiveBiasAttention(_QKV):
    """A relative bias that is *not* ALiBi (``table[h, |i − j|]``, T5-like, index and causal
    mask in buffers): no slope fits; it is a fixed per-head function of the offset."""

    def __init__(self, width=32, heads=4, max_len=64):
        super().__init__(width, heads)
        pos = torch.arange(max_len)
        self.register_buffer("table", torch.randn(heads, max_len), persistent=False)
        self.register_buffer("distance", (pos[:, None] - pos[None, :]).abs(), persistent=False)
        self.register_buffer("future", pos[None, :] > pos[:, None], persistent=False)

    def forward(self, x):
        q, k, v = self.heads(x)
        s = q.shape[-2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        scores = scores + self.table[:, self.distance[:s, :s]]
        scores = scores.masked_fill(self.future[:s, :s], float("-inf"))
        return self.out(torch.softmax(scores, -1) @ v)


class PairBiasAttention(_QKV):
    """A learned bias per (query, key) pair (a ``[H, L, L]`` parameter, sliced to S × S): no
    function of the offset, and its gradient is the whole matrix: not proved (falls back, warned)."""

    def __init__(self, width=32, heads=4, max_len=64):
        super().__init__(width, heads)
        self.pair = nn.Parameter(0.1 * torch.randn(heads, max_len, max_len))

    def forward(self, x):
        q, k, v = self.heads(x)
        s = q.shape[-2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + self.pair[:, :s, :s]
        return self.out(torch.softmax(scores, -1) @ v)


class SoftcapAttention(_QKV):
    """Gemma 2: repeat_kv for GQA, ``scores / cap → tanh → * cap`` on scaled scores, a causal
    additive ``finfo.min`` mask, softmax in fp32."""

    def __init__(self, width=32, heads=4, cap=5.0, kv_heads=2):
        super().__init__(width, heads, kv_heads)
        self.cap = cap

    def forward(self, x):
        q, k, v = self.heads(x)
        b, s = q.shape[0], q.shape[2]
        n = self.h // self.hkv
        k = k[:, :, None].expand(b, self.hkv, n, s, self.d).reshape(b, self.h, s, self.d)
        v = v[:, :, None].expand(b, self.hkv, n, s, self.dv).reshape(b, self.h, s, self.dv)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.d ** -0.5
        scores = scores / self.cap
        scores = torch.tanh(scores)
        scores = scores * self.cap
        causal = torch.full((s, s), torch.finfo(q.dtype).min, dtype=q.dtype, device=x.device).triu(1)
        scores = scores + causal[None, None]
        probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
        return self.out(torch.matmul(probs, v))


class MHAAttention(nn.Module):
    """torch ``nn.MultiheadAttention`` (``batch_first`` either way) with a causal float mask
    from ``nn.Transformer.generate_square_subsequent_mask`` (``is_causal`` hint as given)."""

    def __init__(self, width=32, heads=4, batch_first=True, is_causal=False):
        super().__init__()
        self.mha = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.batch_first, self.is_causal = batch_first, is_causal

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)                                   # [S, B, C]
        s = x.shape[1] if self.batch_first else x.shape[0]
        mask = nn.Transformer.generate_square_subsequent_mask(s, device=x.device, dtype=x.dtype)
        y, _ = self.mha(x, x, x, attn_mask=mask, is_causal=self.is_causal, need_weights=False)
        return y if self.batch_first else y.transpose(0, 1)


class EncoderLayerAttention(nn.Module):
    """torch ``nn.TransformerEncoderLayer`` (dropout 0) with a causal mask, sequence-first."""

    def __init__(self, width=32, heads=4):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0)

    def forward(self, x):
        x = x.transpose(0, 1)                                       # [S, B, C]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[0], device=x.device, dtype=x.dtype)
        return self.layer(x, src_mask=mask, is_causal=True).transpose(0, 1)


class SDPAWindowGQA(_QKV):
    """SDPA with a boolean sliding-window mask from ``arange`` and K/V ``repeat_interleave``d for
    grouped-query attention (Mistral-style reference code)."""

    def __init__(self, width=32, heads=4, kv_heads=2, window=5):
        super().__init__(width, heads, kv_heads)
        self.window = window

    def forward(self, x):
        q, k, v = self.heads(x)
        n = self.h // self.hkv
        k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        pos = torch.arange(q.shape[-2], device=x.device)
        diff = pos[:, None] - pos[None, :]
        mask = (diff >= 0) & (diff < self.window)
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


_LOWER_RIGHT: dict[int, object] = {}      # CausalBias by length, outside the modules (it cannot be deep-copied)


class SDPALowerRight(_QKV):
    """SDPA with a ``torch.nn.attention.bias.causal_lower_right`` bias (equal lengths: causal).

    Built once outside ``forward``: Dynamo cannot construct the ``CausalBias`` subclass inside a
    compiled region (graph break "Calling subclass default constructor"), so models keep it."""

    def __init__(self, width=32, heads=4, seq=32):
        from torch.nn.attention.bias import causal_lower_right
        super().__init__(width, heads)
        self.seq = seq
        _LOWER_RIGHT.setdefault(seq, causal_lower_right(seq, seq))

    def forward(self, x):
        q, k, v = self.heads(x)
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=_LOWER_RIGHT[self.seq]))


class ValueDimAttention(_QKV):
    """A value head dim different from the query/key head dim (DeepSeek MLA's shape), causal,
    hand-written with a ``tril`` buffer."""

    def __init__(self, width=32, heads=4, v_dim=12, max_len=64):
        super().__init__(width, heads, v_dim=v_dim)
        self.register_buffer("tril", torch.ones(max_len, max_len).tril(), persistent=False)

    def forward(self, x):
        q, k, v = self.heads(x)
        s = q.shape[-2]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
        att = att.masked_fill(self.tril[:s, :s] == 0, float("-inf"))
        return self.out(F.softmax(att, dim=-1) @ v)


class FlexAttention(_QKV):
    """``flex_attention`` with a causal (optionally windowed) ``mask_mod``."""

    def __init__(self, width=32, heads=4, window=None):
        super().__init__(width, heads)
        self.window = window

    def forward(self, x):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        window = self.window

        def mask_mod(b, h, q_idx, kv_idx):
            visible = q_idx >= kv_idx
            if window is not None:
                visible = visible & (q_idx - kv_idx < window)
            return visible
        q, k, v = self.heads(x)
        s = q.shape[-2]
        block_mask = create_block_mask(mask_mod, None, None, s, s, device=str(x.device))
        return self.out(flex_attention(q, k, v, block_mask=block_mask))
