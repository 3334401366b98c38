"""Control collectives: the small all-gathers, all-reduces, broadcasts and barriers that keep
the ranks of a group in agreement (docs/architecture.md, "Control traffic"), on the group's device.

NCCL serves only CUDA tensors, so a control value built on the CPU fails there at the first
call ("No backend type associated with device type cpu"). Every control collective of
seqpar goes through this module, which moves the few numbers to ``control_device(group)`` and
the result back to the CPU, where the callers compare them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar_compiler.torch_compat import control_device

from .stats import record

__all__ = ["control_all_gather", "control_all_reduce_max", "control_barrier", "control_broadcast_object",
           "control_device"]


def control_all_gather(values: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[P, *values.shape] on the CPU: every rank's ``values`` (a few numbers), by group rank."""
    device = control_device(group)
    size = dist.get_world_size(group)
    local = values.to(device)
    gathered = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(gathered, local, group=group)
    record(control_bytes=values.numel() * values.element_size() * (size - 1) * 2)
    return torch.stack(gathered).cpu()


def control_all_reduce_max(values: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The element-wise maximum of ``values`` over the group, on the CPU."""
    local = values.to(control_device(group))
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
    record(control_bytes=values.numel() * values.element_size() * 2)
    return local.cpu()


def control_broadcast_object(obj, group: dist.ProcessGroup, src: int = 0):
    """Group rank ``src``'s ``obj`` (a picklable value) on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, group_src=src, group=group, device=control_device(group))
    return box[0]


def control_barrier(group: dist.ProcessGroup) -> None:
    """A barrier on the group's device (NCCL's barrier needs to know the CUDA device)."""
    device = control_device(group)
    if device.type == "cuda":
        dist.barrier(group=group, device_ids=[device.index])
    else:
        dist.barrier(group=group)
