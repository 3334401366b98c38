"""A DiT written as facebookresearch/DiT writes it (``models.py``), small: the sequence is made
from an image (patchify: a strided conv, ``flatten(2).transpose(1, 2)``), runs through adaLN
transformer blocks with non-causal attention, and is turned back into an image by unpatchify
(``x.reshape(N, h, w, p, p, c)``, ``einsum("nhwpqc->nchpwq")``, ``reshape(N, c, h·p, w·p)``).
``refine`` adds what image models often do next: a 3×3 convolution over H and W.

Shape legend: N batch, C_in image channels, h = w = grid side, p patch size, T = h·w tokens
(the sequence), D width, c output channels.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TinyDiT"]


def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _PatchEmbed(nn.Module):
    """timm's PatchEmbed: [N, C_in, h·p, w·p] → [N, T, D]."""

    def __init__(self, p: int, c_in: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(c_in, dim, kernel_size=p, stride=p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)          # [N, D, h, w] → [N, T, D]


class _Attention(nn.Module):
    """timm's Attention: fused qkv, ``F.scaled_dot_product_attention`` without a mask."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                 # [N, heads, T, D/heads]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class _Block(nn.Module):
    """DiTBlock: adaLN-Zero modulation from the conditioning ``c``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class TinyDiT(nn.Module):
    """DiT on an ``img`` [N, C_in, h·p, w·p] conditioned on ``t`` [N]; returns [N, c, h·p, w·p].

    ``refine``: a 3×3 convolution over the unpatchified image (a halo across the band of rows
    each rank holds; gathered with a warning until convolutions over H and W have a rule).
    ``graph_break``: a graph break inside unpatchify (the grid leaves the frame as a band of
    rows, and the rest runs eagerly on it)."""

    def __init__(self, *, side: int = 8, p: int = 2, c_in: int = 3, dim: int = 32, heads: int = 4,
                 depth: int = 2, refine: bool = False, graph_break: bool = False):
        super().__init__()
        self.p, self.c, self.graph_break = p, c_in, graph_break
        self.x_embedder = _PatchEmbed(p, c_in, dim)
        T = side * side
        self.pos_embed = nn.Parameter(torch.randn(1, T, dim) * 0.02, requires_grad=False)
        self.t_embedder = nn.Sequential(nn.Linear(16, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, p * p * c_in)
        self.refine = nn.Conv2d(c_in, c_in, 3, padding=1) if refine else None

    def _timestep(self, t):
        half = 8
        dtype = self.pos_embed.dtype
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=dtype, device=t.device) / half)
        args = t[:, None].to(dtype) * freqs[None]
        return self.t_embedder(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))

    def unpatchify(self, x):
        """[N, T, p·p·c] → [N, c, h·p, w·p], as DiT writes it."""
        c, p = self.c, self.p
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        if self.graph_break:
            torch._dynamo.graph_break()
        return x.reshape(shape=(x.shape[0], c, h * p, h * p))

    def forward(self, img, t):
        x = self.x_embedder(img) + self.pos_embed                # [N, T, D]
        c = self._timestep(t)                                    # [N, D]
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.adaLN_final(c).chunk(2, dim=1)
        x = self.linear(_modulate(self.norm_final(x), shift, scale))
        out = self.unpatchify(x)
        return self.refine(out) if self.refine is not None else out
