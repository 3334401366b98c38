"""The two collectives of DESIGN §1's gradient convention, as autograd functions over
functional collectives (traceable, so aot_autograd puts them in the forward/backward graphs).

``sum_grad_over_group``    identity forward, all-reduce(sum) backward: where a replicated value
                           (a parameter) meets sharded computation, each rank's gradient of that
                           use covers only its tokens, so the uses are summed (Megatron's "f").
``all_reduce_to_replicated``  all-reduce(sum) forward, identity backward: a value summed from
                           shards is replicated; its gradient is already whole on every rank.

Torch's own functional ``all_reduce`` differentiates to another all-reduce, which would make
gradients P times too large here; hence these wrappers.
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from .ring_op import resolve_group

__all__ = ["sum_grad_over_group", "all_reduce_to_replicated"]


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


def sum_grad_over_group(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _SumGradOverGroup.apply(x, group_name)


def all_reduce_to_replicated(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _AllReduceToReplicated.apply(x, group_name)
