"""The two collectives of the gradient convention (docs/architecture.md), as autograd functions over
functional collectives (traceable, so aot_autograd puts them in the forward/backward graphs).

``sum_grad_over_group``    identity forward, all-reduce(sum) backward: where a replicated value
                           (a parameter) meets sharded computation, each rank's gradient of that
                           use covers only its tokens, so the uses are summed (Megatron's "f").
``all_reduce_to_replicated``  all-reduce(sum) forward, identity backward: a value summed from
                           shards is replicated; its gradient is already whole on every rank.
``shard_sequence_partial``  ``seqpar::shard_sequence`` whose backward leaves the gradient partial:
                           this rank's slice scattered into zeros, no all-gather. Under
                           ``SEQPAR_GRAD_REDUCE=none`` every gradient leaves the backward partial,
                           the entry shard's too, so one sum over dp × sp is exact.
``shard_entry_activation``  a frame's entry shard of a plain full-length activation (the eager
                           root's embedding output under per-block compile / FSDP2): the backward
                           hands the gradient back as a ``SequenceShard``, never building it at
                           full length; the eager code that made the activation runs its backward
                           with the shard rules (an embedding: local rows, one sum of the table's
                           gradient, or partial under ``GRAD_REDUCE=none``).
``sum_grads_over_group``   ``sum_grad_over_group`` for a bucket of parameters at once:
                           one all-reduce of their flattened gradients instead of one per tensor,
                           as DDP buckets; autograd runs it once every gradient of the bucket is
                           ready, so buckets filled in backward order reduce while the rest of the
                           backward still runs.

Torch's own functional ``all_reduce`` differentiates to another all-reduce, which would make
gradients P times too large here; hence these wrappers.
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from .ring_op import resolve_group

__all__ = ["sum_grad_over_group", "sum_grads_over_group", "all_reduce_to_replicated", "shard_sequence_partial",
           "shard_entry_activation"]


class _SumGradOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group_name: str) -> torch.Tensor:
        ctx.group_name = group_name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return funcol.all_reduce(grad.contiguous(), "sum", resolve_group(ctx.group_name)), None


class _AllReduceToReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group_name: str) -> torch.Tensor:
        return funcol.all_reduce(x.contiguous(), "sum", resolve_group(group_name))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _SumGradsOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group_name: str, *xs: torch.Tensor):
        ctx.group_name = group_name
        ctx.metas = [(x.shape, x.dtype, x.device) for x in xs]
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        # a parameter with no gradient this step still takes its place in the bucket: every rank
        # runs the same graph, so every rank sends the same sizes
        flat = torch.cat([(g if g is not None else torch.zeros(shape, dtype=dtype, device=device))
                          .reshape(-1) for g, (shape, dtype, device) in zip(grads, ctx.metas)])
        summed = funcol.all_reduce(flat, "sum", resolve_group(ctx.group_name))
        out, start = [], 0
        for shape, _, _ in ctx.metas:
            n = shape.numel()
            out.append(summed[start:start + n].view(shape))
            start += n
        return (None, *out)


def sum_grads_over_group(group_name: str, *xs: torch.Tensor) -> tuple:
    """Identity on a bucket of same-dtype tensors; their gradients are summed over the group
    by one all-reduce."""
    return _SumGradsOverGroup.apply(group_name, *xs)


def sum_grad_over_group(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _SumGradOverGroup.apply(x, group_name)


def all_reduce_to_replicated(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _AllReduceToReplicated.apply(x, group_name)


class _ShardSequencePartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, schedule: str, group_name: str) -> torch.Tensor:
        ctx.dim, ctx.schedule, ctx.group_name, ctx.full = dim % x.dim(), schedule, group_name, x.shape
        return torch.ops.seqpar.shard_sequence.default(x, dim, schedule, group_name)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        from .layout import local_positions
        group = resolve_group(ctx.group_name)
        rank, P = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
        index = local_positions(ctx.schedule, rank, P, ctx.full[ctx.dim], device=grad.device)
        full = grad.new_zeros(ctx.full).index_copy(ctx.dim, index, grad)
        return full, None, None, None


def shard_sequence_partial(x: torch.Tensor, dim: int, schedule: str, group_name: str) -> torch.Tensor:
    """This rank's shard of a full tensor; its gradient stays partial (GRAD_REDUCE=none).

    Shapes: ``x [..., S, ...]`` (S at ``dim``) → ``[..., S/P, ...]``; the gradient of ``x`` is
    zero outside this rank's positions."""
    return _ShardSequencePartial.apply(x, dim, schedule, group_name)


class _ShardEntryActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, spec) -> torch.Tensor:
        ctx.spec = spec
        return torch.ops.seqpar.shard_sequence.default(x, spec.dim, spec.schedule, spec.group_name)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from .sequence_shard import SequenceShard
        # the full gradient, held as this rank's rows: autograd accepts it for the plain input
        # (same shape, dtype, device); what consumes it runs the eager shard rules
        return (None if grad is None else SequenceShard(grad, ctx.spec)), None


def shard_entry_activation(x: torch.Tensor, spec) -> torch.Tensor:
    """This rank's rows of a plain full activation entering a frame; its gradient leaves as a
    ``SequenceShard`` in ``spec`` (no all-gather, no full-length tensor).

    Shapes: ``x [B, S, ...]`` (S at ``spec.dim``) -> ``[B, S/P, ...]``; the gradient of ``x`` is a
    SequenceShard of global shape ``[B, S, ...]`` holding ``[B, S/P, ...]``. Under
    ``spec.grad_reduce == "none"`` the eager rules leave what they contract over the sequence
    partial (a gradient sum gathered by a rule-less op would not be, so that raises).

    A leaf (a user's input that requires grad) keeps a plain ``.grad``: gathered, or under
    ``none`` this rank's rows in zeros (partial), as the user reads or sums it."""
    if x.requires_grad and x.grad_fn is None:
        if spec.grad_reduce == "none":
            return shard_sequence_partial(x, spec.dim, spec.schedule, spec.group_name)
        return torch.ops.seqpar.shard_sequence.default(x, spec.dim, spec.schedule, spec.group_name)
    return _ShardEntryActivation.apply(x, spec)
