"""Every private torch internal seqpar relies on, and every torch 2.11-vs-2.13 difference, in one place.

GPU machines run torch 2.11, the CI 2.13. Callers import what they need from here
and never reach into ``torch.distributed.distributed_c10d`` or compare versions themselves, so a
torch upgrade that moves an internal breaks one small module, not every caller.

A leaf module: imports torch only (``kernels/`` and ``runtime/`` may use it).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["TORCH_VERSION", "MIN_TORCH", "control_device", "group_device_types"]


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int(minor)


TORCH_VERSION = _version(torch.__version__)
# The oldest torch seqpar runs on: P2POp's ``group_peer`` and ``broadcast_object_list``'s
# ``group_src`` (2.6), ``torch.library.custom_op``'s register_autograd (2.4). The GPU machines
# here have 2.11; the CI runs 2.13.
MIN_TORCH = (2, 6)


def group_device_types(group: dist.ProcessGroup) -> list[str]:
    """The device types ``group`` has a backend for (``init_process_group("cuda:gloo")``: ["cuda"])."""
    return [d.type for d in group._device_types]


def control_device(group: dist.ProcessGroup) -> torch.device:
    """The device of ``group``'s control collectives (agreement and same-batch checks,
    calibration, ``auto``'s broadcast): the current CUDA device under NCCL, CPU under gloo.

    torch's own rule for object collectives (``_get_object_coll_device``): the group's one
    device type, CPU when the group serves CPU among others. NCCL serves no CPU tensors
    ("No backend type associated with device type cpu"), nor does ``"cuda:gloo"``.
    """
    from torch.distributed.distributed_c10d import _get_object_coll_device
    kind = _get_object_coll_device(group)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"seqpar: the process group serves only {', '.join(group_device_types(group))} "
                               f"tensors, but CUDA is not available in this process; initialise the group with "
                               f"a backend for this process's device (\"gloo\" on CPU, \"nccl\" on GPUs)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)
