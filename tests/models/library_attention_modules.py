"""Faithful minimal models of how litgpt and torchtune write attention masks, for the libraries
that are not in the test environment (their attention code follows the libraries'; the rest of
a block is the usual pre-norm residual). Each model's forward takes ids and returns logits.

  * ``LitGPTModel(variant="window")``: litgpt ``CausalSelfAttention`` in training (no KV cache):
    sliding-window layers build ``full(-inf).triu(1) + full(-inf).tril(-W)`` and call SDPA with
    it, the other layers SDPA ``is_causal=True``; GQA by ``repeat_interleave``;
  * ``variant="softcap"``: litgpt's soft-capped path: ``q @ k.mT * scale``, ``tanh`` capping, a
    mask made by ``ones.triu(1)`` and an in-place ``masked_fill_(mask.bool(), finfo.min)``;
  * ``variant="loop"``: a window mask filled row by row in a Python loop (older litgpt
    ``build_mask_cache``), with ``masked_fill``;
  * ``TorchtuneGemma2Model``: torchtune's ``Gemma2Attention.forward`` without a KV cache:
    ``q.mul_(scaling)`` in place, ``tril(ones)`` turned into a ``-2.3819763e38`` bias, the sliding
    window as ``triu(ones, -W + 1) * tril(ones, W - 1)`` on every other layer, soft-capping,
    ``softmax(output.float()).type_as(q)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LitGPTModel", "TorchtuneGemma2Model"]


class _LitGPTAttention(nn.Module):
    def __init__(self, d: int, heads: int, groups: int, window: int | None, variant: str):
        super().__init__()
        self.heads, self.groups, self.head_size = heads, groups, d // heads
        self.window, self.variant, self.softcap = window, variant, 20.0
        self.qkv = nn.Linear(d, (heads + 2 * groups) * self.head_size, bias=False)
        self.proj = nn.Linear(heads * self.head_size, d, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        hs = self.head_size
        q, k, v = self.qkv(x).split((self.heads * hs, self.groups * hs, self.groups * hs), dim=-1)
        q = q.view(B, T, self.heads, hs).transpose(1, 2)
        k = k.view(B, T, self.groups, hs).transpose(1, 2)
        v = v.view(B, T, self.groups, hs).transpose(1, 2)
        if self.groups != self.heads:
            q_per_kv = self.heads // self.groups
            k = k.repeat_interleave(q_per_kv, dim=1)
            v = v.repeat_interleave(q_per_kv, dim=1)
        mask = None
        if self.window is not None and T > self.window:
            if self.variant == "loop":
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                for i in range(T):                          # row by row: keys older than the window
                    mask[i, :max(0, i - self.window + 1)] = False
            else:
                mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device)
                mask = mask.triu(diagonal=1) + mask.tril(diagonal=-self.window)
                mask = mask.view(1, 1, T, T)
        scale = 1.0 / math.sqrt(hs)
        if self.variant == "softcap":
            scores = q @ k.mT * scale
            scores = torch.tanh(scores / self.softcap) * self.softcap
            if mask is None:
                mask = torch.ones(T, T, dtype=q.dtype, device=q.device).triu(diagonal=1)
                mask.masked_fill_(mask.bool(), torch.finfo(q.dtype).min)
            scores = F.softmax(scores + mask, dim=-1, dtype=torch.float).to(dtype=q.dtype)
            y = scores @ v
        elif self.variant == "loop":
            scores = (q @ k.mT) * scale
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                scores = scores.masked_fill(~causal, float("-inf"))
            y = scores.softmax(-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=scale,
                                               is_causal=mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.heads * hs))


class _Gemma2Attention(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, window: int | None, softcap: float = 50.0):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.sliding_window_size, self.softcapping = window, softcap
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(d, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.output_proj = nn.Linear(heads * self.head_dim, d, bias=False)

    def forward(self, x):
        b, s_x, _ = x.shape
        q_per_kv = self.num_heads // self.num_kv_heads
        q = self.q_proj(x).view(b, s_x, self.num_kv_heads * q_per_kv, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s_x, self.num_kv_heads, 1, self.head_dim)
        v = self.v_proj(x).view(b, s_x, self.num_kv_heads, 1, self.head_dim)
        if self.num_heads != self.num_kv_heads:
            k = k.expand(b, s_x, self.num_kv_heads, q_per_kv, self.head_dim)
            v = v.expand(b, s_x, self.num_kv_heads, q_per_kv, self.head_dim)
        k = k.reshape(b, s_x, -1, self.head_dim).transpose(1, 2)
        v = v.reshape(b, s_x, -1, self.head_dim).transpose(1, 2)
        q.mul_(self.scaling)
        output = torch.matmul(q, k.transpose(2, 3))
        mask = torch.tril(torch.ones(size=(s_x, s_x), dtype=torch.bool).to(x.device))
        mask = torch.where(mask.logical_not(), -2.3819763e38, 0)
        if self.sliding_window_size is not None:
            all_ones = torch.ones_like(mask)
            sliding_mask = torch.triu(all_ones, -1 * self.sliding_window_size + 1) * torch.tril(
                all_ones, self.sliding_window_size - 1)
            mask = torch.where(sliding_mask == 1, mask, -2.3819763e38)
        output = output / self.softcapping
        output = torch.tanh(output)
        output = output * self.softcapping
        output = output + mask
        output = F.softmax(output.float(), dim=-1).type_as(q)
        output = torch.matmul(output, v)
        output = output.transpose(1, 2).contiguous().view(b, s_x, -1)
        return self.output_proj(output)


class _Block(nn.Module):
    def __init__(self, d: int, attn: nn.Module):
        super().__init__()
        self.norm_1, self.attn, self.norm_2 = nn.RMSNorm(d), attn, nn.RMSNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d, bias=False), nn.SiLU(), nn.Linear(2 * d, d, bias=False))

    def forward(self, x):
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class _LM(nn.Module):
    def __init__(self, blocks, vocab: int, d: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList(blocks)
        self.ln_f = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class LitGPTModel(_LM):
    """litgpt's attention on every layer; the window on even layers (litgpt's ``sliding_window_indices``)."""

    def __init__(self, variant: str = "window", vocab: int = 128, d: int = 64, heads: int = 4, groups: int = 2,
                 layers: int = 2, window: int = 8):
        super().__init__([_Block(d, _LitGPTAttention(d, heads, groups, window if i % 2 == 0 else None, variant))
                          for i in range(layers)], vocab, d)


class TorchtuneGemma2Model(_LM):
    """torchtune's Gemma 2 attention; the window on every other layer, as Gemma 2 alternates."""

    def __init__(self, vocab: int = 128, d: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2,
                 window: int = 8):
        super().__init__([_Block(d, _Gemma2Attention(d, heads, kv_heads, window if i % 2 == 0 else None))
                          for i in range(layers)], vocab, d)
