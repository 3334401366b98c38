"""Op-coverage idioms of the corpus (issue 12): the non-attention code real models are written
with. Each module has one causal self-attention (so the frame is sharded) and one idiom."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_corpus import B, C, D, H, S, V, CausalSelfAttention, idiom, labels, token_ids


class _LM(nn.Module):
    """embedding -> attention -> head; ``body`` / ``loss`` hooks are what an idiom overrides."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, C)
        self.attn = CausalSelfAttention()
        self.head = nn.Linear(C, V, bias=False)

    def body(self, x):
        return x + self.attn(x)

    def loss(self, logits, y):
        return F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))

    def forward(self, ids, y):
        return self.loss(self.head(self.body(self.emb(ids))), y)


def _lm(cls):
    return lambda: (cls(), (token_ids(), labels()))


# -- views and unbind ------------------------------------------------------------------------------
class _UnbindKV(_LM):
    """litgpt / minGPT: one kv projection, ``kv.view(B, T, 2, H, D).unbind(2)``."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(C, 2 * C)

    def body(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, H, D).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, H, D).unbind(2)
        y = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return x + y.transpose(1, 2).reshape(b, t, C)


idiom("unbind-kv")(_lm(_UnbindKV))


class _FlattenLoss(_LM):
    """``logits.flatten(0, 1)`` and ``y.flatten()`` before the loss."""

    def loss(self, logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())


idiom("flatten-before-loss")(_lm(_FlattenLoss))


def _complex_freqs(t: int, d: int) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    return torch.polar(torch.ones(t, d // 2), torch.outer(torch.arange(t).float(), inv))


class _ComplexRope(_LM):
    """torchtitan / Meta Llama: RoPE through ``view_as_complex`` on a ``freqs_cis`` buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("freqs_cis", _complex_freqs(S, D), persistent=False)

    def body(self, x):
        b, t, _ = x.shape
        q, k, v = self.attn.qkv(x).split(C, dim=-1)
        q, k, v = (u.view(b, t, H, D) for u in (q, k, v))
        fc = self.freqs_cis[:t].view(1, t, 1, D // 2)
        q = torch.view_as_real(torch.view_as_complex(q.float().reshape(b, t, H, -1, 2)) * fc).flatten(3)
        k = torch.view_as_real(torch.view_as_complex(k.float().reshape(b, t, H, -1, 2)) * fc).flatten(3)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return x + self.attn.proj(y.transpose(1, 2).reshape(b, t, C))


idiom("complex-rope-buffer")(_lm(_ComplexRope))


class _PolarRope(_LM):
    """complex RoPE computed in the forward with ``torch.polar`` over ``arange`` positions."""

    def body(self, x):
        b, t, _ = x.shape
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=x.device).float() / D))
        ang = torch.outer(torch.arange(t, device=x.device).float(), inv)
        fc = torch.polar(torch.ones_like(ang), ang)[None, :, None, :]       # [1, T, 1, D/2]
        q, k, v = self.attn.qkv(x).split(C, dim=-1)
        q, k, v = (u.view(b, t, H, D) for u in (q, k, v))
        q = torch.view_as_real(torch.view_as_complex(q.reshape(b, t, H, -1, 2)) * fc).reshape(b, t, H, D)
        k = torch.view_as_real(torch.view_as_complex(k.reshape(b, t, H, -1, 2)) * fc).reshape(b, t, H, D)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return x + self.attn.proj(y.transpose(1, 2).reshape(b, t, C))


idiom("complex-rope-polar")(_lm(_PolarRope))


class _Baseline(_LM):
    """The plain module (view(-1, V) before the loss): must shard today."""


idiom("baseline-view-loss")(_lm(_Baseline))
