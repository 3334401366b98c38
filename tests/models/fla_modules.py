"""A hybrid language model written here in flash-linear-attention's reference style: chunked
gated linear attention with a scalar decay per head (fla's ``simple_gla``), heads-first
``[B, H, T, D]`` tensors, the chunk form written in plain torch, between causal softmax
attention layers.

The chunk form: inside a chunk, decayed causal attention; across chunks, the state
``S_i = exp(G_{i-1}) S_{i-1} + kv_{i-1}`` (G: a chunk's total log decay, kv: its keys times its
values, decayed to its end), computed for every chunk at once from the initial state put in
front of the chunk states and a lower-triangular matrix of decays between chunk ends, as
fla's torch references do when they take an ``initial_state`` and ``output_final_state``.

Shape legend: B batch, H heads, T tokens, n = T / C chunks of C tokens, K key dim, V value dim.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["chunk_simple_gla", "GLAHybridLM"]


def chunk_simple_gla(q, k, v, g, chunk_size: int, scale: float, initial_state=None, output_final_state=False):
    """q, k [B, H, T, K], v [B, H, T, V], g [B, H, T] (log decay, <= 0) -> o [B, H, T, V]
    (and the state after the last token [B, H, K, V] with ``output_final_state``)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    n = T // C
    q = (q * scale).reshape(B, H, -1, C, K)                               # [B, H, n, C, K]
    k = k.reshape(B, H, -1, C, K)
    v = v.reshape(B, H, -1, C, V)
    g = g.reshape(B, H, -1, C).cumsum(-1)                                 # log decay from the chunk start
    causal = torch.tril(torch.ones(C, C, dtype=torch.bool, device=q.device))
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(~causal, float("-inf")).exp()   # [B, H, n, C, C]
    intra = ((q @ k.transpose(-1, -2)) * decay) @ v                       # [B, H, n, C, V]
    kv = (k * (g[..., -1:] - g).exp()[..., None]).transpose(-1, -2) @ v   # [B, H, n, K, V]
    h0 = q.new_zeros(B, H, 1, K, V) if initial_state is None else initial_state[:, :, None]
    states = torch.cat([h0, kv], dim=2)                                   # [B, H, n+1, K, V]
    ends = F.pad(g[..., -1], (1, 0)).cumsum(-1)                           # [B, H, n+1]
    lower = torch.tril(torch.ones(n + 1, n + 1, dtype=torch.bool, device=q.device))
    between = (ends[..., :, None] - ends[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    new = torch.einsum("bhij,bhjkv->bhikv", between, states)              # [B, H, n+1, K, V]
    S, final = new[:, :, :-1], new[:, :, -1]                              # chunk starts; after the last
    inter = (q * g.exp()[..., None]) @ S                                  # [B, H, n, C, V]
    o = (intra + inter).reshape(B, H, T, V)
    return (o, final) if output_final_state else o


class _RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(width)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class GatedLinearAttention(nn.Module):
    """fla's ``SimpleGatedLinearAttention``-like layer: projections, a log-sigmoid gate per head."""

    def __init__(self, width: int, heads: int, chunk: int):
        super().__init__()
        self.heads, self.chunk, self.dk = heads, chunk, width // heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.g_proj = nn.Linear(width, heads)
        self.o_norm = _RMSNorm(self.dk)
        self.o_proj = nn.Linear(width, width, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.heads, self.dk).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        g = (F.logsigmoid(self.g_proj(x)) / 16).transpose(1, 2)                  # [B, H, T]
        o = chunk_simple_gla(q, k, v, g, self.chunk, self.dk ** -0.5)
        o = self.o_norm(o).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(o)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(width, 3 * width, bias=False), nn.Linear(width, width, bias=False)

    def forward(self, x):
        B, T, W = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(B, T, W))


class _Block(nn.Module):
    def __init__(self, mixer: nn.Module, width: int):
        super().__init__()
        self.norm1, self.mixer, self.norm2 = _RMSNorm(width), mixer, _RMSNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GLAHybridLM(nn.Module):
    """Embedding, then (gated linear attention block, attention block) pairs, then the head."""

    def __init__(self, vocab: int, width: int, heads: int, layers: int, chunk: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            _Block(GatedLinearAttention(width, heads, chunk) if i % 2 == 0 else _Attention(width, heads), width)
            for i in range(layers))
        self.norm, self.head = _RMSNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids, labels=None, use_cache=None):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return {"loss": loss, "logits": logits}
