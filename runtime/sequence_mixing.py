"""Sequence-mixing ops on shards: a convolution over time with its halo, and scans with a carry.

``seqpar::padded_conv1d(x, w, b, left, right, dilation, groups)``  one process's op: ``conv1d``
    of ``x`` zero-padded by ``left``/``right`` positions. The compiled path rewrites the two ways
    models write a causal convolution into it (``passes/causal_conv.py``): ``F.pad(x, (k−1, 0))``
    then ``conv1d``, and ``Conv1d(padding=k−1)`` then ``[..., :S]`` (HF Mamba2, Bamba, Falcon-H1).
``seqpar::halo_conv1d(x, w, b, left, right, dilation, groups, schedule, group_name)``  the same
    on this rank's shard: each run of consecutive positions is extended by ``left`` rows before
    and ``right`` after, fetched from whichever ranks hold them (``sequence_fetch``, zero outside
    the sequence), and convolved unpadded; autograd flows through the fetch (its backward returns
    the halo's gradient to its owner).
``seqpar::sequence_scan(x, dim, kind, schedule, group_name)``  ``cumsum``/``cumprod``/
    ``logcumsumexp`` along the sequence: a local scan per run, the runs' totals all-gathered
    (P·runs small values), the combination of the totals of every earlier run (an exclusive
    prefix), and a local correction. The backward is autograd's through these pieces: the reverse
    scan locally, and the totals' gradients summed back to their owners.

The two sharded ops are ``CompositeImplicitAutograd``: in a compiled graph the node names the op
(the dump, the cost model), and AOT autograd traces through it to the fetch and the collectives.

Shape legend: x ``[B, C, S/P]`` for the convolutions (time last, as ``conv1d``), ``[..., S/P, ...]``
with the sequence at ``dim`` for scans; P group size; a run is a layout segment
(``layout.local_segments``): one on the contiguous layout, two on zigzag.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor

from .layout import local_segments
from .ring_op import resolve_group
from .sequence_fetch import halo_kind, sequence_fetch_backward_op, sequence_fetch_op

__all__ = ["padded_conv1d_op", "SCAN_KINDS", "scan_runs_ok", "halo_runs_ok"]

SCAN_KINDS = ("cumsum", "cumprod", "logcumsumexp")


# -- one process: the padded convolution ---------------------------------------------------------
@torch.library.custom_op("seqpar::padded_conv1d", mutates_args=())
def padded_conv1d_op(x: Tensor, weight: Tensor, bias: Tensor | None, left: int, right: int, dilation: int,
                     groups: int) -> Tensor:
    return F.conv1d(F.pad(x, (left, right)), weight, bias, dilation=dilation, groups=groups)


@padded_conv1d_op.register_fake
def _(x, weight, bias, left, right, dilation, groups):
    length = x.shape[-1] + left + right - dilation * (weight.shape[-1] - 1)
    return x.new_empty((*x.shape[:-2], weight.shape[0], length))


def _padded_setup(ctx, inputs, output):
    x, weight, bias, ctx.left, ctx.right, ctx.dilation, ctx.groups = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _padded_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    padded = F.pad(x, (ctx.left, ctx.right))
    unbatched = x.dim() == 2
    if unbatched:
        padded, grad = padded.unsqueeze(0), grad.unsqueeze(0)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, padded, weight, [weight.shape[0]] if ctx.has_bias else None, [1], [0], [ctx.dilation], False, [0],
        ctx.groups, [True, True, ctx.has_bias])
    gx = gx.narrow(-1, ctx.left, x.shape[-1])
    return (gx.squeeze(0) if unbatched else gx), gw, gb, None, None, None, None


padded_conv1d_op.register_autograd(_padded_backward, setup_context=_padded_setup)


# -- on shards -----------------------------------------------------------------------------------
def _rank_and_size(group_name: str) -> tuple[int, int]:
    group = resolve_group(group_name)
    return (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))


def halo_runs_ok(schedule: str, P: int, S_local: int) -> bool:
    """Every rank's tokens are runs of consecutive positions (contiguous, zigzag; not striped)."""
    return all(seg.stride == 1 for r in range(P) for seg in local_segments(schedule, r, P, S_local))


def scan_runs_ok(schedule: str, P: int, S_local: int) -> bool:
    """Runs of consecutive positions, as many on every rank (the totals' all-gather is even)."""
    counts = {len(local_segments(schedule, r, P, S_local)) for r in range(P)}
    return halo_runs_ok(schedule, P, S_local) and len(counts) == 1


_lib = torch.library.Library("seqpar", "FRAGMENT")
_lib.define("halo_conv1d(Tensor x, Tensor weight, Tensor? bias, int left, int right, int dilation, int groups, "
            "str schedule, str group_name) -> Tensor")
_lib.define("sequence_scan(Tensor x, int dim, str kind, str schedule, str group_name) -> Tensor")
_lib.define("halo_conv1d_backward(Tensor grad, Tensor x, Tensor weight, SymInt[]? bias_sizes, int left, int right, "
            "int dilation, int groups, bool[3] output_mask, str schedule, str group_name) "
            "-> (Tensor?, Tensor?, Tensor?)")


def _halo_conv1d(x, weight, bias, left, right, dilation, groups, schedule, group_name):
    rank, P = _rank_and_size(group_name)
    outs, width = [], left + right
    halo = sequence_fetch_op(x, -1, halo_kind(left, right), schedule, group_name) if width else None  # [B, C, runs·(L+R)]
    for j, seg in enumerate(local_segments(schedule, rank, P, x.shape[-1])):
        run = x.narrow(-1, seg.offset, seg.count)
        if width:
            run = torch.cat([halo.narrow(-1, j * width, left), run, halo.narrow(-1, j * width + left, right)], dim=-1)
        outs.append(F.conv1d(run, weight, bias, dilation=dilation, groups=groups))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _halo_conv1d_backward(grad, x, weight, bias_sizes, left, right, dilation, groups, output_mask, schedule,
                          group_name):
    """``convolution_backward`` of ``halo_conv1d`` on shards, for the eager path (where autograd
    records the ATen convolution, not the composite): per run, the backward of the unpadded
    convolution of the haloed run; the halo's input gradient goes back to its owners
    (``sequence_fetch_backward``); the weight and bias gradients are this rank's part of a sum."""
    rank, P = _rank_and_size(group_name)
    kind, width = halo_kind(left, right), left + right
    halo = sequence_fetch_op(x, -1, kind, schedule, group_name) if width else None
    gx = x.new_zeros(x.shape) if output_mask[0] else None
    halo_grads, gw, gb = [], None, None
    for j, seg in enumerate(local_segments(schedule, rank, P, x.shape[-1])):
        parts = [x.narrow(-1, seg.offset, seg.count)]
        if width:
            parts = [halo.narrow(-1, j * width, left), parts[0], halo.narrow(-1, j * width + left, right)]
        run = torch.cat(parts, dim=-1)
        g = grad.narrow(-1, seg.offset, seg.count)
        gx_j, gw_j, gb_j = torch.ops.aten.convolution_backward(
            g, run, weight, bias_sizes, [1], [0], [dilation], False, [0], groups, output_mask)
        if gx is not None:
            gx[..., seg.offset:seg.offset + seg.count] = gx_j.narrow(-1, left, seg.count)
            halo_grads += [gx_j.narrow(-1, 0, left), gx_j.narrow(-1, left + seg.count, right)]
        gw = gw_j if gw is None else gw + gw_j
        gb = gb_j if gb is None else gb + gb_j
    if gx is not None and width:
        gx = gx + sequence_fetch_backward_op(torch.cat(halo_grads, dim=-1).contiguous(), -1, kind, schedule,
                                             group_name, x.shape[-1])
    return gx, gw, gb


class _GatherTotals(torch.autograd.Function):
    """All-gather along dim 0; the backward sums every rank's gradient of this rank's part
    (an all-reduce, then this rank's rows: what gloo runs, where reduce-scatter may be missing)."""

    @staticmethod
    def forward(ctx, x: Tensor, group_name: str) -> Tensor:
        ctx.group_name, ctx.rows = group_name, x.shape[0]
        return funcol.all_gather_tensor(x.contiguous(), 0, resolve_group(group_name))

    @staticmethod
    def backward(ctx, grad: Tensor):
        rank, _ = _rank_and_size(ctx.group_name)
        summed = funcol.all_reduce(grad.contiguous(), "sum", resolve_group(ctx.group_name))
        return summed.narrow(0, rank * ctx.rows, ctx.rows), None


def _scan(x: Tensor, dim: int, kind: str) -> Tensor:
    return getattr(torch, kind)(x, dim)


def _prefix(every: Tensor, earlier: Tensor, kind: str) -> Tensor:
    """The combination of the totals ``every`` [P·runs, ...] picked by the bool mask ``earlier``
    (at least one picked). Masked with ``where``, not indexed, so that the gradient of every
    total is computed on every rank (zeros where unused): the gather's backward is a collective
    every rank must reach."""
    shape = (-1,) + (1,) * (every.dim() - 1)
    pick = earlier.view(shape)
    if kind == "cumsum":
        return torch.where(pick, every, 0).sum(0)
    if kind == "cumprod":
        return torch.where(pick, every, 1).prod(0)
    return torch.logsumexp(torch.where(pick, every, float("-inf")), 0)


def _correct(local: Tensor, prefix: Tensor, kind: str) -> Tensor:
    if kind == "cumsum":
        return local + prefix
    if kind == "cumprod":
        return local * prefix
    return torch.logaddexp(local, prefix)


def _sequence_scan(x, dim, kind, schedule, group_name):
    rank, P = _rank_and_size(group_name)
    dim %= x.dim()
    segs = local_segments(schedule, rank, P, x.shape[dim])
    runs = [_scan(x.narrow(dim, s.offset, s.count), dim, kind) for s in segs]
    if P == 1:
        return runs[0] if len(runs) == 1 else torch.cat(runs, dim)
    totals = torch.stack([r.select(dim, r.shape[dim] - 1) for r in runs])            # [runs, ...]
    every = _GatherTotals.apply(totals, group_name)                                    # [P·runs, ...]
    starts = [s.start for r in range(P) for s in local_segments(schedule, r, P, x.shape[dim])]
    outs = []
    for seg, run in zip(segs, runs):
        earlier = torch.tensor([st < seg.start for st in starts], device=x.device)   # runs before this one
        if seg.start == 0:
            # nothing before the first run: add an exact zero that still depends on the totals
            zero = torch.where(earlier.view((-1,) + (1,) * (every.dim() - 1)), every, 0).sum(0)
            outs.append(run + zero.unsqueeze(dim))
            continue
        outs.append(_correct(run, _prefix(every, earlier, kind).unsqueeze(dim), kind))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim)


_lib.impl("halo_conv1d", _halo_conv1d, "CompositeImplicitAutograd")
_lib.impl("sequence_scan", _sequence_scan, "CompositeImplicitAutograd")
_lib.impl("halo_conv1d_backward", _halo_conv1d_backward, "CompositeImplicitAutograd")
