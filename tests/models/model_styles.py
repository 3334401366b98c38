"""Whole small LMs in the styles of six codebases (issue 12), written for seqpar's tests.

Each is the code a user brings, unmodified: ``torch.compile(model, backend="seqpar")`` must make
it sequence-parallel, exact, with every attention running as the ring. Two layers, width 32,
S = 32, vocabulary 64; fp32; every model returns the mean next-token loss.

  torchtitan-llama3  RMSNorm, complex RoPE on a ``freqs_cis`` buffer (``view_as_complex``),
                     GQA by ``repeat_kv`` on [B, S, H, D], SwiGLU, loss on ``flatten(0, 1)``
  litgpt             one grouped qkv projection split per query group, RoPE by cos/sin
                     caches, K/V expanded per group, SDPA ``is_causal``, LLaMA MLP
  x-transformers     einops ``rearrange``, ``einsum`` scores with a sliding-window mask filled
                     with ``-finfo.max``, pre-LayerNorm, GELU feed-forward
  gpt-neox           parallel residual, partial rotary (a quarter of the head dim),
                     ``baddbmm`` scores and ``torch.where`` on a ``tril`` buffer
  mpt                ALiBi (MPT's key-only bias, no positional embedding) in an additive
                     mask to SDPA, fused Wqkv, LayerNorm without bias
  torch-encoder      ``nn.TransformerEncoder`` (batch_first, norm_first) with a causal mask
                     from ``generate_square_subsequent_mask`` and ``is_causal=True``
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_corpus import Idiom, labels, token_ids

__all__ = ["STYLES", "LAYERS"]

V, C, H, LAYERS, S = 64, 32, 4, 2, 32
D = C // H


class _LM(nn.Module):
    """ids [B, S] → embedding → blocks → norm → head → mean cross-entropy against ``y``."""

    def __init__(self, block, norm=nn.LayerNorm):
        super().__init__()
        self.emb = nn.Embedding(V, C)
        self.blocks = nn.ModuleList(block() for _ in range(LAYERS))
        self.norm = norm(C)
        self.head = nn.Linear(C, V, bias=False)

    def forward(self, ids, y):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(0, 1))


# -- torchtitan Llama 3 ---------------------------------------------------------------------------
def _freqs_cis(d, end, theta=500000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    t = torch.arange(end, dtype=torch.float32)
    return torch.polar(torch.ones(end, d // 2), torch.outer(t, freqs))


class _TitanAttention(nn.Module):
    def __init__(self, kv_heads=2):
        super().__init__()
        self.kv = kv_heads
        self.wq = nn.Linear(C, H * D, bias=False)
        self.wk = nn.Linear(C, kv_heads * D, bias=False)
        self.wv = nn.Linear(C, kv_heads * D, bias=False)
        self.wo = nn.Linear(H * D, C, bias=False)

    def forward(self, x, freqs_cis):
        bs, seqlen, _ = x.shape
        xq = self.wq(x).view(bs, seqlen, -1, D)
        xk = self.wk(x).view(bs, seqlen, -1, D)
        xv = self.wv(x).view(bs, seqlen, -1, D)
        fc = freqs_cis[:seqlen].view(1, seqlen, 1, D // 2)
        xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
        xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
        xq = torch.view_as_real(xq_ * fc).flatten(3).type_as(xq)
        xk = torch.view_as_real(xk_ * fc).flatten(3).type_as(xk)
        n_rep = H // self.kv
        keys = xk[:, :, :, None, :].expand(bs, seqlen, self.kv, n_rep, D).reshape(bs, seqlen, H, D)
        values = xv[:, :, :, None, :].expand(bs, seqlen, self.kv, n_rep, D).reshape(bs, seqlen, H, D)
        out = F.scaled_dot_product_attention(xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             is_causal=True)
        return self.wo(out.transpose(1, 2).contiguous().view(bs, seqlen, -1))


class _TitanBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = _TitanAttention()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(C, eps=1e-5), nn.RMSNorm(C, eps=1e-5)
        self.w1, self.w3 = nn.Linear(C, 64, bias=False), nn.Linear(C, 64, bias=False)
        self.w2 = nn.Linear(64, C, bias=False)
        self.register_buffer("freqs_cis", _freqs_cis(D, 2 * S), persistent=False)

    def forward(self, x):
        h = x + self.attention(self.attention_norm(x), self.freqs_cis)
        z = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(z)) * self.w3(z))


# -- litgpt ---------------------------------------------------------------------------------------
class _LitAttention(nn.Module):
    def __init__(self, groups=2):
        super().__init__()
        self.groups = groups
        self.qkv = nn.Linear(C, (H + 2 * groups) * D, bias=True)
        self.proj = nn.Linear(H * D, C, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
        ang = torch.outer(torch.arange(2 * S).float(), inv).repeat(1, 2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    @staticmethod
    def _rope(x, cos, sin):
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, x):
        B, T, _ = x.shape
        q_per_kv = H // self.groups
        qkv = self.qkv(x).view(B, T, self.groups, q_per_kv + 2, D).permute(0, 2, 3, 1, 4)
        q, k, v = qkv.split((q_per_kv, 1, 1), dim=2)
        k = k.expand(B, self.groups, q_per_kv, T, D)
        v = v.expand(B, self.groups, q_per_kv, T, D)
        q, k, v = (t.reshape(B, -1, T, D) for t in (q, k, v))
        cos, sin = self.cos[:T], self.sin[:T]
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(D))
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))


class _LitBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm_1, self.norm_2 = nn.RMSNorm(C), nn.RMSNorm(C)
        self.attn = _LitAttention()
        self.fc_1, self.fc_2 = nn.Linear(C, 48, bias=False), nn.Linear(C, 48, bias=False)
        self.mlp_proj = nn.Linear(48, C, bias=False)

    def forward(self, x):
        x = x + self.attn(self.norm_1(x))
        z = self.norm_2(x)
        return x + self.mlp_proj(F.silu(self.fc_1(z)) * self.fc_2(z))


# -- x-transformers -------------------------------------------------------------------------------
class _XBlock(nn.Module):
    def __init__(self, window=8):
        super().__init__()
        from attention_modules import EinsumAttention
        self.norm1, self.norm2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = EinsumAttention(C, H, window=window)
        self.ff = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    def forward(self, x):
        x = self.attn(self.norm1(x)) + x
        return self.ff(self.norm2(x)) + x


# -- GPT-NeoX -------------------------------------------------------------------------------------
class _NeoXAttention(nn.Module):
    def __init__(self, rotary_pct=0.25):
        super().__init__()
        self.rot = int(D * rotary_pct)
        self.query_key_value = nn.Linear(C, 3 * C)
        self.dense = nn.Linear(C, C)
        self.register_buffer("bias", torch.tril(torch.ones(2 * S, 2 * S, dtype=torch.bool)).view(1, 1, 2 * S, 2 * S),
                             persistent=False)
        inv = 1.0 / (10000 ** (torch.arange(0, self.rot, 2).float() / self.rot))
        emb = torch.outer(torch.arange(2 * S).float(), inv).repeat(1, 2)
        self.register_buffer("cos_cached", emb.cos()[None, None], persistent=False)
        self.register_buffer("sin_cached", emb.sin()[None, None], persistent=False)

    def _rotate(self, x, cos, sin):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, x):
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, H, 3 * D).permute(0, 2, 1, 3)
        q, k, v = qkv[..., :D], qkv[..., D: 2 * D], qkv[..., 2 * D:]
        cos, sin = self.cos_cached[:, :, :s], self.sin_cached[:, :, :s]
        q = torch.cat((self._rotate(q[..., : self.rot], cos, sin), q[..., self.rot:]), dim=-1)
        k = torch.cat((self._rotate(k[..., : self.rot], cos, sin), k[..., self.rot:]), dim=-1)
        scores = torch.zeros(b * H, s, s, dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(scores, q.reshape(b * H, s, D), k.reshape(b * H, s, D).transpose(1, 2),
                               beta=1.0, alpha=1.0 / math.sqrt(D))
        scores = scores.view(b, H, s, s)
        mask_value = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype, device=scores.device)
        scores = torch.where(self.bias[:, :, :s, :s], scores, mask_value)
        out = torch.matmul(F.softmax(scores, dim=-1), v)
        return self.dense(out.permute(0, 2, 1, 3).reshape(b, s, C))


class _NeoXBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attention = _NeoXAttention()
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    def forward(self, x):           # parallel residual: x + attn(ln1(x)) + mlp(ln2(x))
        return x + self.attention(self.input_layernorm(x)) + self.mlp(self.post_attention_layernorm(x))


# -- MPT ------------------------------------------------------------------------------------------
class _MPTBlock(nn.Module):
    def __init__(self):
        super().__init__()
        from attention_modules import alibi_slopes
        self.norm_1, self.norm_2 = nn.LayerNorm(C, bias=False), nn.LayerNorm(C, bias=False)
        self.Wqkv = nn.Linear(C, 3 * C, bias=False)
        self.out_proj = nn.Linear(C, C, bias=False)
        self.ffn = nn.Sequential(nn.Linear(C, 4 * C, bias=False), nn.GELU(), nn.Linear(4 * C, C, bias=False))
        self.register_buffer("slopes", alibi_slopes(H).view(1, H, 1, 1), persistent=False)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.Wqkv(self.norm_1(x)).chunk(3, dim=2)
        q, k, v = (t.view(b, s, H, D).transpose(1, 2) for t in (q, k, v))
        alibi = self.slopes * torch.arange(1 - s, 1, dtype=torch.int32, device=x.device).view(1, 1, 1, s)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        bias = alibi.masked_fill(~causal.view(1, 1, s, s), torch.finfo(q.dtype).min).to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + self.out_proj(y.transpose(1, 2).reshape(b, s, C))
        return x + self.ffn(self.norm_2(x))


# -- torch nn.TransformerEncoder ------------------------------------------------------------------
class _TorchEncoderLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, C)
        self.pos = nn.Embedding(2 * S, C)
        layer = nn.TransformerEncoderLayer(C, H, 2 * C, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(C, V)

    def forward(self, ids, y):
        s = ids.shape[1]
        x = self.emb(ids) + self.pos(torch.arange(s, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(s, device=ids.device)
        x = self.encoder(x, mask=mask, is_causal=True)
        return F.cross_entropy(self.head(x).view(-1, V), y.view(-1))


def _style(name, make):
    return Idiom(name, lambda: (make(), (token_ids(), labels())), ring_calls=LAYERS)


STYLES: dict[str, Idiom] = {s.name: s for s in [
    _style("torchtitan-llama3", lambda: _LM(_TitanBlock, norm=nn.RMSNorm)),
    _style("litgpt", lambda: _LM(_LitBlock, norm=nn.RMSNorm)),
    _style("x-transformers", lambda: _LM(_XBlock)),
    _style("gpt-neox", lambda: _LM(_NeoXBlock)),
    _style("mpt", lambda: _LM(_MPTBlock)),
    _style("torch-encoder", _TorchEncoderLM),
]}


def run_styles(rank: int, P: int, names: list[str], inner: str = "aot_eager", schedule: str = "zigzag") -> dict:
    """Run the named styles on this rank: plain data per style (``idiom_corpus`` checks it)."""
    import traceback

    import idiom_corpus
    results = {}
    for name in names:
        try:
            results[name] = idiom_corpus._run_one(STYLES[name], schedule, inner)
        except Exception:  # noqa: BLE001 - reported per style by the test
            results[name] = {"error": traceback.format_exc()[-4000:]}
    return results
