"""The sharding core's rules for ops that mix the sequence: convolutions over time, rolls and
flips, scans. Each runs on the shards through an op that knows the group (``OpPlan.call``):
``seqpar::halo_conv1d`` and ``seqpar::sequence_scan`` (``runtime/sequence_mixing.py``),
``seqpar::sequence_fetch`` (``runtime/sequence_fetch.py``).

Which layouts: a convolution and a scan need the tokens of a rank to be runs of consecutive
positions (contiguous, zigzag, the hybrid's pieces for convolutions); striped holds every P-th
token, where a halo is the whole shard, so it is refused (gathered, warned) and ``auto`` picks a
contiguous layout for a model with such ops (``seqpar_compiler/auto_schedule.py``). A roll or a
flip is a fixed permutation: exact on every layout, one message per pair of ranks that exchange
rows (none for a flip on zigzag).

Shape legend: S global length, P group size, S/P local length; the sequence is a plain dim
(pre = post = 1): a merged (batch × sequence) dim is refused.
"""
from __future__ import annotations

import torch

from ..sequence_fetch import shift_kind
from ..sequence_mixing import SCAN_KINDS, halo_runs_ok, scan_runs_ok
from .dtensor_bridge import TENSOR
from .ops import OpPlan, Refusal, TensorArg, _check_layout_op, _Context, _dtensor_plan, _rule
from .placements import Partial, Shard

__all__ = ["MIXING_OPS"]

aten = torch.ops.aten
_fetch = torch.ops.seqpar.sequence_fetch.default
_halo_conv1d = torch.ops.seqpar.halo_conv1d.default
_scan = torch.ops.seqpar.sequence_scan.default
_padded_conv1d = torch.ops.seqpar.padded_conv1d.default
_halo_conv1d_backward = torch.ops.seqpar.halo_conv1d_backward.default

MIXING_OPS = (aten.convolution.default, aten.convolution_backward.default, _padded_conv1d, aten.roll.default,
              aten.flip.default, aten.constant_pad_nd.default,
              aten.cumsum.default, aten.cumprod.default, aten.logcumsumexp.default)


def _sharded(t) -> bool:
    return isinstance(t, TensorArg) and isinstance(t.placement, Shard)


def _seq_dim(src: TensorArg, dim, ctx: _Context) -> bool:
    """``dim`` is ``src``'s sequence dim, which must be plain to be mixed along, at a length
    known when the graph is built (the exchange maps are static)."""
    if not _sharded(src) or dim % len(src.shape) != src.placement.dim:
        return False
    if not src.placement.plain:
        raise Refusal("mixing along a sequence merged with another dim")
    if not isinstance(ctx.S, int):
        raise Refusal("mixing along a sequence of symbolic length (its halo map is built per length)")
    return True


def _not_along_sequence(op, args, kwargs, ctx: _Context) -> OpPlan:
    _check_layout_op(op, args, kwargs)
    return _dtensor_plan(op, args, kwargs, ctx)


def _replicated_weights(*ts) -> None:
    if any(_sharded(t) for t in ts if t is not None):
        raise Refusal("a convolution whose weight or bias is sharded")


def _conv_plan(x: TensorArg, weight: TensorArg, bias, left: int, right: int, dilation: int, groups: int,
               ctx: _Context) -> OpPlan:
    _replicated_weights(weight, bias)
    if not halo_runs_ok(ctx.schedule, ctx.P, ctx.S // ctx.P):
        raise Refusal(f"a convolution over time on the {ctx.schedule!r} layout (its tokens are not runs)")
    operands = ("local", "whole") + (("whole",) if bias is not None else ())
    args = (TENSOR, TENSOR, None if bias is None else TENSOR, left, right, dilation, groups, ctx.schedule,
            ctx.group_name or "")
    return OpPlan(operands, args, {}, (Shard(x.placement.dim),), (1, 1), call=_halo_conv1d)


def _time_dim_ok(x: TensorArg, ctx: _Context) -> bool:
    """``x`` is ``[B, C, S]`` or ``[C, S]`` sharded along its last dim (time, for ``conv1d``)."""
    return _sharded(x) and len(x.shape) in (2, 3) and _seq_dim(x, len(x.shape) - 1, ctx)


@_rule(aten.convolution.default)
def _convolution(op, args, kwargs, ctx: _Context) -> OpPlan:
    """A 1-D convolution over the sequence whose output keeps the length ("same" padding,
    p = d·(k−1)/2 each side, stride 1): the halo is p positions each side."""
    x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = args
    if not _time_dim_ok(x, ctx):
        return _dtensor_plan(op, args, kwargs, ctx)
    if transposed or len(stride) != 1 or list(stride) != [1]:
        raise Refusal("a strided or transposed convolution over the sequence")
    k, d, p = weight.shape[-1], dilation[0], padding[0]
    if 2 * p != d * (k - 1):
        raise Refusal("a convolution over the sequence that changes its length")
    return _conv_plan(x, weight, bias, p, p, d, groups, ctx)


@_rule(aten.convolution_backward.default)
def _convolution_backward(op, args, kwargs, ctx: _Context) -> OpPlan:
    """The eager backward of a same-length convolution over the sequence (the compiled path
    differentiates ``halo_conv1d`` itself): the input's gradient a shard, the weight's and the
    bias's this rank's part of a sum."""
    grad, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask = args
    if not _time_dim_ok(x, ctx):
        return _dtensor_plan(op, args, kwargs, ctx)
    if _sharded(grad) and grad.placement == x.placement:
        grad_how = "local"
    elif not _sharded(grad) and tuple(grad.shape) == tuple(x.shape):
        grad_how = ("slice", x.placement.dim)       # a full-length gradient: this rank's part of it
    else:
        raise Refusal("a convolution's gradient sharded unlike its input")
    k, d, p = weight.shape[-1], dilation[0], padding[0]
    if transposed or list(stride) != [1] or 2 * p != d * (k - 1):
        raise Refusal("the backward of a convolution over the sequence that is strided or changes its length")
    _replicated_weights(weight)
    if not halo_runs_ok(ctx.schedule, ctx.P, ctx.S // ctx.P):
        raise Refusal(f"a convolution over time on the {ctx.schedule!r} layout (its tokens are not runs)")
    outputs = tuple(None if shape is None else placement for shape, placement in
                    zip(ctx.out_shapes, (Shard(x.placement.dim), Partial("sum"), Partial("sum"))))
    args = (TENSOR, TENSOR, TENSOR, bias_sizes, p, p, d, groups, list(mask), ctx.schedule, ctx.group_name or "")
    return OpPlan((grad_how, "local", "whole"), args, {}, outputs, (1, 1), call=_halo_conv1d_backward)


@_rule(_padded_conv1d)
def _padded(op, args, kwargs, ctx: _Context) -> OpPlan:
    """A causal convolution (left = d·(k−1), right = 0), or any padding that keeps the length."""
    x, weight, bias, left, right, dilation, groups = args
    if not _time_dim_ok(x, ctx):
        return _dtensor_plan(op, args, kwargs, ctx)
    if left + right != dilation * (weight.shape[-1] - 1):
        raise Refusal("a convolution over the sequence that changes its length")
    return _conv_plan(x, weight, bias, left, right, dilation, groups, ctx)


@_rule(aten.roll.default)
def _roll(op, args, kwargs, ctx: _Context) -> OpPlan:
    """``roll`` along the sequence by k: each local token takes position g−k (mod S) from wherever
    it lies; only the k boundary rows per run cross ranks."""
    x = args[0]
    shifts = list(args[1]) if isinstance(args[1], (list, tuple)) else [args[1]]
    dims = args[2] if len(args) > 2 else kwargs.get("dims", [])
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if not _sharded(x) or not any(_seq_dim(x, d, ctx) for d in dims):
        return _not_along_sequence(op, args, kwargs, ctx)
    if len(dims) != 1 or len(shifts) != 1:
        raise Refusal("a roll along the sequence and another dim at once")
    return OpPlan(("local",), (TENSOR, dims[0], shift_kind(int(shifts[0]) % ctx.S), ctx.schedule,
                               ctx.group_name or ""), {}, (x.placement,), (1, 1), call=_fetch)


@_rule(aten.constant_pad_nd.default)
def _shift_by_padding(op, args, kwargs, ctx: _Context) -> OpPlan:
    """Zero padding that keeps the sequence's length — k positions in front, k cropped at the end
    (RWKV's time shift, ``nn.ZeroPad2d((0, 0, 1, -1))``), or the reverse — is a shift by k with
    zero fill: a fetch of position g−k. Any other padding along the sequence changes its length
    and is refused."""
    x, pad = args[0], list(args[1])
    value = args[2] if len(args) > 2 else kwargs.get("value", 0)
    if not _sharded(x):
        return _not_along_sequence(op, args, kwargs, ctx)
    i = 2 * (len(x.shape) - 1 - x.placement.dim)
    if i >= len(pad) or (pad[i] == 0 and pad[i + 1] == 0) or not _seq_dim(x, x.placement.dim, ctx):
        return _not_along_sequence(op, args, kwargs, ctx)
    left, right = pad[i], pad[i + 1]
    if left + right != 0 or value not in (0, 0.0, None) or any(w for j, w in enumerate(pad) if j not in (i, i + 1)):
        raise Refusal("padding along the sequence dim")
    return OpPlan(("local",), (TENSOR, x.placement.dim, shift_kind(left, circular=False), ctx.schedule,
                               ctx.group_name or ""), {}, (x.placement,), (1, 1), call=_fetch)


@_rule(aten.flip.default)
def _flip(op, args, kwargs, ctx: _Context) -> OpPlan:
    """``flip`` along the sequence: position S−1−g (on zigzag each rank's own rows, reversed)."""
    x, dims = args[0], list(args[1])
    if not _sharded(x) or not any(_seq_dim(x, d, ctx) for d in dims):
        return _not_along_sequence(op, args, kwargs, ctx)
    if len(dims) != 1:
        raise Refusal("a flip along the sequence and another dim at once")
    return OpPlan(("local",), (TENSOR, dims[0], "flip", ctx.schedule, ctx.group_name or ""), {},
                  (x.placement,), (1, 1), call=_fetch)


@_rule(aten.cumsum.default, aten.cumprod.default, aten.logcumsumexp.default)
def _scan_rule(op, args, kwargs, ctx: _Context) -> OpPlan:
    """A scan along the sequence: local scans, the other ranks' totals, a local correction."""
    x, dim = args[0], (args[1] if len(args) > 1 else kwargs["dim"])
    if not _sharded(x) or not _seq_dim(x, dim, ctx):
        return _not_along_sequence(op, args, kwargs, ctx)
    if kwargs.get("dtype") is not None or len(args) > 2:
        raise Refusal(f"{op} with a dtype along the sequence")
    if not scan_runs_ok(ctx.schedule, ctx.P, ctx.S // ctx.P):
        raise Refusal(f"a scan along the sequence on the {ctx.schedule!r} layout (its tokens are not runs)")
    kind = op._schema.name.split("::")[1]
    assert kind in SCAN_KINDS
    return OpPlan(("local",), (TENSOR, dim, kind, ctx.schedule, ctx.group_name or ""), {}, (x.placement,), (1, 1),
                  call=_scan)
