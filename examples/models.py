"""Small transformers written the ordinary way, for tests, benchmarks and the demo.

Nothing in them knows about seqpar: ``torch.compile(model, backend="seqpar")`` must make them
sequence-parallel unchanged. Shapes: B batch, T sequence, C width, nh heads, hs head size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "GPT", "LlamaConfig", "Llama"]


@dataclass(kw_only=True)
class GPTConfig:
    """nanoGPT-style: learned absolute positions, LayerNorm, GELU MLP, SDPA causal attention."""

    vocab_size: int = 256
    block_size: int = 1024
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    attention: str = "sdpa"        # "sdpa", or "manual": softmax(q kᵀ / √d + mask) v written out
    window: int | None = None      # manual attention only: a sliding window of this many keys
    prefix: int = 0                # manual attention only: the first `prefix` tokens see each other


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.cfg = cfg
        # nanoGPT's mask buffer for its non-flash path, only where that path runs: it is
        # block_size² floats (4 GiB per layer at 32k tokens)
        if cfg.attention == "manual":
            self.register_buffer("bias", torch.tril(torch.ones(cfg.block_size, cfg.block_size))
                                 .view(1, 1, cfg.block_size, cfg.block_size), persistent=False)

    def _manual(self, q, k, v):
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))      # (B, nh, T, T)
        if self.cfg.window is None and not self.cfg.prefix:
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        else:
            i = torch.arange(T, device=q.device)
            visible = i[:, None] >= i[None, :]
            if self.cfg.window is not None:
                visible = visible & (i[:, None] - i[None, :] < self.cfg.window)
            if self.cfg.prefix:
                visible = visible | ((i[:, None] < self.cfg.prefix) & (i[None, :] < self.cfg.prefix))
            att = att.masked_fill(~visible, float("-inf"))
        att = F.softmax(att, dim=-1)
        return att @ v

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)   # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.cfg.attention == "manual":
            y = self._manual(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class GPTBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx, targets=None):
        B, T = idx.size()
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


@dataclass(kw_only=True)
class LlamaConfig:
    """LLaMA-style: RoPE, RMSNorm, SwiGLU, grouped-query attention."""

    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    n_embd: int = 64
    ffn_hidden: int = 128
    rope_base: float = 10000.0
    max_seq_len: int = 4096


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.nh, self.nkv = cfg.n_head, cfg.n_kv_head
        self.hs = cfg.n_embd // cfg.n_head
        self.wq = nn.Linear(cfg.n_embd, self.nh * self.hs, bias=False)
        self.wk = nn.Linear(cfg.n_embd, self.nkv * self.hs, bias=False)
        self.wv = nn.Linear(cfg.n_embd, self.nkv * self.hs, bias=False)
        self.wo = nn.Linear(self.nh * self.hs, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.nh, self.hs).transpose(1, 2)       # (B, nh, T, hs)
        k = self.wk(x).view(B, T, self.nkv, self.hs).transpose(1, 2)      # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, self.nkv, self.hs).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd)
        self.attn = LlamaAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd)
        self.w1 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd)
        self.out = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        hs = cfg.n_embd // cfg.n_head
        inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        t = torch.arange(T, device=idx.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)                               # (T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)                            # (T, hs)
        cos, sin = emb.cos(), emb.sin()
        x = self.tok(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.out(self.norm(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def reference_scale(hs: int) -> float:
    return 1.0 / math.sqrt(hs)


class PackedDocAttention(nn.Module):
    """One attention layer over packed documents, its mask written the way transformers builds
    it: ``(kv <= q) & (doc[b, q] == doc[b, kv])`` over index aranges. x [B, T, C], doc [B, T]."""

    def __init__(self, n_embd: int = 32, n_head: int = 4):
        super().__init__()
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head

    def forward(self, x, doc):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(x).split(C, 2))
        b = torch.arange(B, device=x.device)[:, None, None, None]
        qi = torch.arange(T, device=x.device)[None, None, :, None]
        ki = torch.arange(T, device=x.device)[None, None, None, :]
        visible = (ki <= qi) & (doc[b, qi] == doc[b, ki]).to(x.device)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // self.n_head))
        att = att.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        return self.proj(y).pow(2).mean()
