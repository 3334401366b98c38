"""Blockwise FFN (BPT, docs/architecture.md): the op pair ``seqpar::blockwise_ffn`` → out and
``seqpar::blockwise_ffn_backward`` → gradients, placed in graphs by ``passes/blockwise_ffn.py``.

A per-token block ``out = W_out(act(W_act x + b_act) [* (W_mul x + b_mul)]) + b_out`` (a GELU
MLP, or a gated one such as SwiGLU when ``w_mul`` is given) is computed over ``chunks`` slices of
the tokens. Its hidden activation ``[tokens, hidden]`` (4–8× the width, the largest activation of
a long sequence) exists for one slice at a time, in the forward and in the backward, which
recomputes each slice's hidden activation from the block's input. Being one opaque op pair
(like the ring op pair), the construction survives aot_autograd, the partitioner and inductor
unchanged: the partitioner can only save the block's input, never its hidden activation.

The bodies run below autograd and differentiate by hand (linear algebra and the activation's
ATen backward). Exact up to summation order: weight gradients are sums over slices.

Shape legend: x [..., C] (any leading dims, e.g. [B, S_local, C]; tokens N = their product),
w_act/w_mul [H, C], b_act/b_mul [H], w_out [C_out, H], b_out [C_out], out [..., C_out].
Tokens are sliced after flattening the leading dims, so a slice never holds [B, S_local, H].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "blockwise_ffn_op", "blockwise_ffn_backward_op", "blockwise_ffn_forward",
           "blockwise_ffn_backward", "token_slices"]

ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")


def _act(name: str, a: Tensor) -> Tensor:
    if name == "gelu":
        return F.gelu(a)
    if name == "gelu_tanh":
        return F.gelu(a, approximate="tanh")
    if name == "silu":
        return F.silu(a)
    return F.relu(a)


def _act_backward(name: str, grad: Tensor, a: Tensor) -> Tensor:
    aten = torch.ops.aten
    if name == "gelu":
        return aten.gelu_backward(grad, a)
    if name == "gelu_tanh":
        return aten.gelu_backward(grad, a, approximate="tanh")
    if name == "silu":
        return aten.silu_backward(grad, a)
    return aten.threshold_backward(grad, a, 0)


def token_slices(n: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` contiguous [start, end) ranges covering n tokens (fewer when n < chunks)."""
    chunks = max(1, min(chunks, n))
    bounds = [n * i // chunks for i in range(chunks + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(chunks)]


def _check(x, w_act, b_act, w_mul, b_mul, w_out, b_out, activation, chunks) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown blockwise FFN activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    if chunks < 1:
        raise ValueError(f"blockwise FFN chunks must be >= 1; got {chunks}")
    H, C = w_act.shape
    if x.shape[-1] != C or w_out.dim() != 2 or w_out.shape[1] != H:
        raise ValueError(f"blockwise FFN shapes disagree: x {tuple(x.shape)}, w_act {tuple(w_act.shape)}, "
                         f"w_out {tuple(w_out.shape)} (need x [..., C], w_act [H, C], w_out [C_out, H])")
    if w_mul is not None and w_mul.shape != w_act.shape:
        raise ValueError(f"gated FFN weights differ: w_act {tuple(w_act.shape)}, w_mul {tuple(w_mul.shape)}")


def _hidden(rows: Tensor, w_act, b_act, w_mul, b_mul, activation):
    """One slice's (pre-activation, gate value, multiplier, hidden); all [n, H]."""
    a = F.linear(rows, w_act, b_act)
    g = _act(activation, a)
    m = F.linear(rows, w_mul, b_mul) if w_mul is not None else None
    return a, g, m, (g * m if m is not None else g)


def blockwise_ffn_forward(x, w_act, b_act, w_mul, b_mul, w_out, b_out, activation: str, chunks: int) -> Tensor:
    """The forward body: the block over token slices (a plain function, so a test can watch the
    ATen calls it makes)."""
    _check(x, w_act, b_act, w_mul, b_mul, w_out, b_out, activation, chunks)
    rows = x.reshape(-1, x.shape[-1])                                   # [N, C]
    out = x.new_empty(rows.shape[0], w_out.shape[0])                     # [N, C_out]
    for s, e in token_slices(rows.shape[0], chunks):
        *_, h = _hidden(rows[s:e], w_act, b_act, w_mul, b_mul, activation)   # [n, H]: one slice only
        out[s:e] = F.linear(h, w_out, b_out)
    return out.view(*x.shape[:-1], w_out.shape[0])


@torch.library.custom_op("seqpar::blockwise_ffn", mutates_args=())
def blockwise_ffn_op(x: Tensor, w_act: Tensor, b_act: Tensor | None, w_mul: Tensor | None, b_mul: Tensor | None,
                     w_out: Tensor, b_out: Tensor | None, activation: str, chunks: int) -> Tensor:
    return blockwise_ffn_forward(x, w_act, b_act, w_mul, b_mul, w_out, b_out, activation, chunks)


@blockwise_ffn_op.register_fake
def _(x, w_act, b_act, w_mul, b_mul, w_out, b_out, activation, chunks):
    _check(x, w_act, b_act, w_mul, b_mul, w_out, b_out, activation, chunks)
    return x.new_empty(*x.shape[:-1], w_out.shape[0])


def blockwise_ffn_backward(dout, x, w_act, b_act, w_mul, b_mul, w_out, b_out, activation: str, chunks: int):
    """The backward body: (dx, dw_act, db_act, dw_mul, db_mul, dw_out, db_out), each slice's
    hidden activation recomputed from x; an absent weight's gradient is an empty tensor (a
    custom op returns tensors only)."""
    C = x.shape[-1]
    rows, drows = x.reshape(-1, C), dout.reshape(-1, w_out.shape[0])   # [N, C], [N, C_out]
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    dx = torch.empty_like(rows)
    zeros = (lambda *shape: torch.zeros(shape, dtype=acc, device=x.device))
    dw_act, dw_out = zeros(*w_act.shape), zeros(*w_out.shape)
    db_act = zeros(w_act.shape[0]) if b_act is not None else None
    db_out = zeros(w_out.shape[0]) if b_out is not None else None
    dw_mul = zeros(*w_act.shape) if w_mul is not None else None
    db_mul = zeros(w_act.shape[0]) if b_mul is not None else None
    for s, e in token_slices(rows.shape[0], chunks):
        xs, dys = rows[s:e], drows[s:e]                                  # [n, C], [n, C_out]
        a, g, m, h = _hidden(xs, w_act, b_act, w_mul, b_mul, activation)  # recomputed, [n, H]
        dw_out += (dys.t() @ h).to(acc)
        if db_out is not None:
            db_out += dys.sum(0).to(acc)
        dh = dys @ w_out                                                 # [n, H]
        if m is not None:
            dm = dh * g
            dw_mul += (dm.t() @ xs).to(acc)
            if db_mul is not None:
                db_mul += dm.sum(0).to(acc)
            dh = dh * m
        da = _act_backward(activation, dh, a)
        dw_act += (da.t() @ xs).to(acc)
        if db_act is not None:
            db_act += da.sum(0).to(acc)
        dxs = da @ w_act
        if m is not None:
            dxs += dm @ w_mul
        dx[s:e] = dxs
    # separate empties: a custom op's outputs may not alias one another
    cast = (lambda t, like: t.to(like.dtype) if t is not None else x.new_empty(0))
    return (dx.view(x.shape), cast(dw_act, w_act), cast(db_act, w_act), cast(dw_mul, w_act),
            cast(db_mul, w_act), cast(dw_out, w_out), cast(db_out, w_out))


@torch.library.custom_op("seqpar::blockwise_ffn_backward", mutates_args=())
def blockwise_ffn_backward_op(dout: Tensor, x: Tensor, w_act: Tensor, b_act: Tensor | None, w_mul: Tensor | None,
                              b_mul: Tensor | None, w_out: Tensor, b_out: Tensor | None, activation: str,
                              chunks: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return blockwise_ffn_backward(dout, x, w_act, b_act, w_mul, b_mul, w_out, b_out, activation, chunks)


@blockwise_ffn_backward_op.register_fake
def _(dout, x, w_act, b_act, w_mul, b_mul, w_out, b_out, activation, chunks):
    like = (lambda t: torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None
            else x.new_empty(0))
    return (torch.empty_like(x, memory_format=torch.contiguous_format), like(w_act), like(b_act), like(w_mul),
            like(b_mul), like(w_out), like(b_out))


def _setup_context(ctx, inputs, output):
    x, w_act, b_act, w_mul, b_mul, w_out, b_out, activation, chunks = inputs
    ctx.save_for_backward(x, w_act, b_act, w_mul, b_mul, w_out, b_out)
    ctx.options = (activation, chunks)


def _backward(ctx, dout):
    x, w_act, b_act, w_mul, b_mul, w_out, b_out = ctx.saved_tensors
    grads = blockwise_ffn_backward_op(dout.contiguous(), x, w_act, b_act, w_mul, b_mul, w_out, b_out, *ctx.options)
    present = (x, w_act, b_act, w_mul, b_mul, w_out, b_out)
    return (*(g if t is not None else None for g, t in zip(grads, present)), None, None)


blockwise_ffn_op.register_autograd(_backward, setup_context=_setup_context)
