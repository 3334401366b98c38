"""Moving a tensor between its full form and a rank's shard in a schedule's layout.

``seqpar::shard_sequence`` takes this rank's part of a full (replicated) tensor: no
communication; its backward gathers, so every rank holds the same full gradient.
``seqpar::gather_sequence`` is the inverse: an all-gather back to natural order; its backward
takes this rank's slice, with no communication (docs/architecture.md, "Gradient convention": a
replicated value made from shards has no communication in its backward).
Both are custom ops so they can sit in compiled graphs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import check_sequence_length, layout_of
from .ring_op import resolve_group

__all__ = ["shard_sequence_op", "gather_sequence_op"]


def _rank_and_size(group_name: str) -> tuple[int, int, dist.ProcessGroup | None]:
    group = resolve_group(group_name)
    if group is None:
        return 0, 1, None
    return dist.get_rank(group), dist.get_world_size(group), group


def _check_dim(x: Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


@torch.library.custom_op("seqpar::shard_sequence", mutates_args=())
def shard_sequence_op(x: Tensor, dim: int, schedule: str, group_name: str) -> Tensor:
    rank, P, _ = _rank_and_size(group_name)
    dim = _check_dim(x, dim)
    if P == 1:
        return x.clone()
    return layout_of(schedule).local_part(x, dim, rank, P)


@shard_sequence_op.register_fake
def _(x, dim, schedule, group_name):
    _, P, _ = _rank_and_size(group_name)
    dim = _check_dim(x, dim)
    check_sequence_length(x.shape[dim], schedule, P)
    shape = list(x.shape)
    shape[dim] //= P
    return x.new_empty(shape)


@torch.library.custom_op("seqpar::gather_sequence", mutates_args=())
def gather_sequence_op(x: Tensor, dim: int, schedule: str, group_name: str) -> Tensor:
    rank, P, group = _rank_and_size(group_name)
    dim = _check_dim(x, dim)
    if P == 1:
        return x.clone()
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(P)]
    dist.all_gather(parts, x, group=group)
    stacked = torch.cat(parts, dim=dim)               # rank-major: positions of rank 0, rank 1, ...
    S = stacked.shape[dim]
    layout = layout_of(schedule)
    if layout.contiguous:
        return stacked
    where = torch.cat([layout.positions(r, P, S, device=x.device) for r in range(P)])
    inverse = torch.empty_like(where)
    inverse[where] = torch.arange(S, device=x.device)
    return stacked.index_select(dim, inverse)


@gather_sequence_op.register_fake
def _(x, dim, schedule, group_name):
    _, P, _ = _rank_and_size(group_name)
    dim = _check_dim(x, dim)
    shape = list(x.shape)
    shape[dim] *= P
    return x.new_empty(shape)


def _save_options(ctx, inputs, output):
    _, ctx.dim, ctx.schedule, ctx.group_name = inputs


def _shard_backward(ctx, grad):
    return gather_sequence_op(grad, ctx.dim, ctx.schedule, ctx.group_name), None, None, None


def _gather_backward(ctx, grad):
    return shard_sequence_op(grad, ctx.dim, ctx.schedule, ctx.group_name), None, None, None


shard_sequence_op.register_autograd(_shard_backward, setup_context=_save_options)
gather_sequence_op.register_autograd(_gather_backward, setup_context=_save_options)
