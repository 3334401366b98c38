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


# -- one-line idioms: each a ``body`` or ``loss`` around the plain attention ------------------------
def _body_idiom(name, fallback=None):
    """Register ``fn(self, x) -> x`` as the body of an _LM (after the attention block)."""
    def register(fn):
        cls = type(f"_{name.replace('-', '_')}", (_LM,), {"body": lambda self, x: fn(self, _LM.body(self, x))})
        idiom(name, fallback=fallback)(_lm(cls))
        return fn
    return register


def _loss_idiom(name, fallback=None):
    def register(fn):
        cls = type(f"_{name.replace('-', '_')}", (_LM,), {"loss": fn})
        idiom(name, fallback=fallback)(_lm(cls))
        return fn
    return register


@_body_idiom("stack-then-mean")
def _stack(self, x):
    return torch.stack([x, 2 * x.tanh()], dim=2).mean(2)


@_body_idiom("unflatten-heads")
def _unflatten(self, x):
    return x.unflatten(-1, (H, D)).softmax(-1).flatten(-2)


@_body_idiom("movedim-heads")
def _movedim(self, x):
    b, t, _ = x.shape
    return x.view(b, t, H, D).movedim(2, 1).sigmoid().movedim(1, 2).reshape(b, t, C)


@_body_idiom("tensor-split-features")
def _tensor_split(self, x):
    a, b = torch.tensor_split(x, 2, dim=-1)
    return torch.cat([b * a.sigmoid(), a], dim=-1)


@_body_idiom("narrow-features")
def _narrow(self, x):
    return torch.cat([x.narrow(-1, 0, C // 2).relu(), x.narrow(-1, C // 2, C // 2)], dim=-1)


@_body_idiom("split-sizes-swiglu")
def _split_sizes(self, x):
    a, b = torch.cat([x, x.flip(-1)], dim=-1).split([C, C], dim=-1)
    return F.silu(a) * b


@_body_idiom("roll-features")
def _roll(self, x):
    return x + 0.5 * x.roll(1, dims=-1)


@_body_idiom("pad-features")
def _pad(self, x):
    return F.pad(x, (0, 8))[..., 4:4 + C]


@_body_idiom("rms-norm-functional")
def _rms_norm(self, x):
    return F.rms_norm(x, (C,), eps=1e-6)


@_body_idiom("rms-norm-by-hand")
def _rms_by_hand(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@_body_idiom("normalize-features")
def _normalize(self, x):
    return F.normalize(x, dim=-1)


@_body_idiom("zeros-like-accumulate")
def _zeros_like(self, x):
    acc = torch.zeros_like(x)
    return acc + x.new_ones(x.shape) * x


@_body_idiom("einsum-projection")
def _einsum(self, x):
    return torch.einsum("bsc,dc->bsd", x, self.head.weight[:C])


@_body_idiom("squeeze-unsqueeze-none")
def _squeeze(self, x):
    return (x[..., None] * 2).squeeze(-1) + x.unsqueeze(0).squeeze(0)


@_body_idiom("cumsum-over-sequence")
def _cumsum(self, x):
    """Causal running mean over the sequence: a scan, sharded exactly (a prefix of the ranks'
    totals carried across ranks)."""
    return x.cumsum(1) / torch.arange(1, x.shape[1] + 1, device=x.device)[:, None]


@_body_idiom("roll-over-sequence")
def _roll_sequence(self, x):
    """Token shift (RWKV): a roll along the sequence, sharded by a halo from the neighbour."""
    return x + x.roll(1, dims=1)


@_loss_idiom("cross-entropy-sum")
def _ce_sum(self, logits, y):
    return F.cross_entropy(logits.view(-1, V), y.view(-1), reduction="sum") / y.numel()


@_loss_idiom("cross-entropy-label-smoothing")
def _ce_smooth(self, logits, y):
    return F.cross_entropy(logits.view(-1, V), y.view(-1), label_smoothing=0.1)


@_loss_idiom("cross-entropy-ignore-index")
def _ce_ignore(self, logits, y):
    y = torch.where(y % 5 == 0, torch.full_like(y, -100), y)
    return F.cross_entropy(logits.view(-1, V), y.view(-1))


@_loss_idiom("cross-entropy-class-dim-1")
def _ce_3d(self, logits, y):
    return F.cross_entropy(logits.transpose(1, 2), y)


@_loss_idiom("log-softmax-gather-targets")
def _gather_loss(self, logits, y):
    return -logits.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1).mean()


@_loss_idiom("masked-token-mean")
def _masked_mean(self, logits, y):
    mask = (y % 3 != 0).float()
    per_token = F.cross_entropy(logits.view(-1, V), y.view(-1), reduction="none").view_as(mask)
    return (per_token * mask).sum() / mask.sum()


@_loss_idiom("z-loss-logsumexp")
def _z_loss(self, logits, y):
    return F.cross_entropy(logits.view(-1, V), y.view(-1)) + 1e-2 * logits.logsumexp(-1).pow(2).mean()


@_loss_idiom("mean-pool-classifier")
def _mean_pool(self, logits, y):
    return logits.mean(1).softmax(-1)[:, 0].sum()


class _PaddingIdx(_LM):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, C, padding_idx=0)


idiom("embedding-padding-idx")(_lm(_PaddingIdx))


class _IndexSelectPositions(_LM):
    """A learned position table read with ``index_select(0, arange(T))``."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(2 * S, C) * 0.1)

    def body(self, x):
        t = x.shape[1]
        return _LM.body(self, x + self.pos.index_select(0, torch.arange(t, device=x.device)))


idiom("index-select-arange-positions")(_lm(_IndexSelectPositions))


class _InvFreqPositionIds(_LM):
    """HF rotary: ``inv_freq[None, :, None] @ position_ids[:, None, :]`` then cos/sin."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)), persistent=False)

    def body(self, x):
        b, t, _ = x.shape
        pos = torch.arange(t, device=x.device)[None].expand(b, t)
        freqs = (self.inv_freq[None, :, None].expand(b, -1, 1) @ pos[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)                  # [B, T, D]
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]        # [B, 1, T, D]
        q, k, v = self.attn.qkv(x).split(C, dim=-1)
        q, k, v = (u.view(b, t, H, D).transpose(1, 2) for u in (q, k, v))

        def rot(u):
            u1, u2 = u[..., :D // 2], u[..., D // 2:]
            return u * cos + torch.cat((-u2, u1), dim=-1) * sin
        y = F.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True)
        return x + self.attn.proj(y.transpose(1, 2).reshape(b, t, C))


idiom("inv-freq-matmul-position-ids")(_lm(_InvFreqPositionIds))


class _RepeatInterleaveGQA(_LM):
    """GQA by ``repeat_interleave`` of 2 KV heads up to 4 query heads."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(C, C)

    def body(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, H, D).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, H // 2, D).permute(2, 0, 3, 1, 4)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + y.transpose(1, 2).reshape(b, t, C)


idiom("repeat-interleave-gqa")(_lm(_RepeatInterleaveGQA))


# -- a user's torch.autograd.Function ---------------------------------------------------------------
class _TanhGelu(torch.autograd.Function):
    """BLOOM's GELU: the tanh approximation with a hand-written backward (elementwise)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        t = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
        return g * (0.5 * x * ((1 - t * t) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + t))


class _AddSequenceMean(torch.autograd.Function):
    """Adds the mean over the sequence: not elementwise (a reduction along it)."""

    @staticmethod
    def forward(ctx, x):
        return x + x.mean(1, keepdim=True)

    @staticmethod
    def backward(ctx, g):
        return g + g.mean(1, keepdim=True)


class _WritingBackward(torch.autograd.Function):
    """A backward that writes into its result in place and never reads the write's return value
    (Phimoe's router: ``grad.scatter_add_(...)``): the body's dead-code pass must keep the write."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x.argmax(-1, keepdim=True))
        return x * 2

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        out = g * 2
        out.scatter_add_(-1, idx, g)
        return out


@_body_idiom("autograd-function-elementwise")
def _autograd_gelu(self, x):
    return x + _TanhGelu.apply(x)


@_body_idiom("autograd-function-over-the-sequence-falls-back", fallback="autograd_function_apply")
def _autograd_sequence_mean(self, x):
    return _AddSequenceMean.apply(x)


@_body_idiom("autograd-function-writing-backward-falls-back", fallback="autograd_function_apply")
def _autograd_writing_backward(self, x):
    return _WritingBackward.apply(x)
