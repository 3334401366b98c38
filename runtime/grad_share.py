"""``share_grad_over_group``: identity forward, gradient ÷ P backward (GRAD_REDUCE=none).

Under ``SEQPAR_GRAD_REDUCE=none`` every gradient must leave the backward *partial*: one sum over
the group's ranks is the single-device gradient. Gradients that reach a parameter through
sharded computation are partial by nature (each rank saw its own tokens). A replicated use that
feeds a value the frame computed from shards (``loss + gain ** 2`` after the loss all-reduce)
sends the same whole gradient to every rank, which the data-parallel sum would count P times;
this op divides it by P on that use, so every rank holds 1/P of it.
"""
from __future__ import annotations

import torch

from .ring_op import resolve_group

__all__ = ["share_grad_over_group"]


class _ShareGradOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group_name: str) -> torch.Tensor:
        ctx.P = torch.distributed.get_world_size(resolve_group(group_name))
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad / ctx.P, None


def share_grad_over_group(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """``x`` unchanged; its gradient divided by the group size (a whole gradient made partial)."""
    return _ShareGradOverGroup.apply(x, group_name)
