"""Say when FSDP2 reduces the gradients seqpar has already summed.

Under ``SEQPAR_GRAD_REDUCE=sum`` (the default) seqpar all-reduces every parameter gradient over
the sequence group inside the backward. When the frame's parameters are managed by FSDP2
(``fully_shard``) over a mesh that spans the sequence group's ranks (FSDP over the same ranks,
or torchtitan's FSDP over the flattened ``dp_shard × cp`` ranks), FSDP then reduce-scatters
the same gradients again over those ranks: exact (FSDP averages equal gradients), but every
gradient crosses the sequence group twice. ``SEQPAR_GRAD_REDUCE=none`` leaves the sum to FSDP,
reduced once, with the loss scaling of docs/training.md (``SEQPAR_GRAD_REDUCE``).

Why seqpar does not switch to ``none`` by itself: under ``none`` FSDP's *mean* over dp·sp
ranks needs the sequence loss multiplied by sp (or ``set_gradient_divide_factor(dp)`` on every
FSDP module, which seqpar never sees all of: the root and the eager code between frames are
not compiled by it). Switching without the user's scaling would leave gradients sp× too small,
silently; a warning with the recipe keeps the default exact.

Reads: the frame's example inputs (Dynamo passes the modules' registered parameters, which
during FSDP2's forward are its unsharded parameters) and FSDP2's per-module states.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["fsdp_meshes_of", "warn_fsdp_reduces_twice"]

_warned_groups: set[str] = set()


def fsdp_meshes_of(example_inputs: Sequence[Any]) -> list:
    """The DeviceMeshes of the FSDP2 parameter groups that own any parameter among
    ``example_inputs`` (empty when no FSDP2 module manages them)."""
    params = {id(x) for x in example_inputs if isinstance(x, torch.nn.Parameter)}
    if not params:
        return []
    try:         # FSDP2 keeps no public registry of its modules: the composable-state map is it
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    meshes = []
    for module in list(_module_state_mapping.keys()):
        if not isinstance(module, FSDPModule):
            continue
        for group in getattr(module._get_fsdp_state(), "_fsdp_param_groups", []):
            owned = {id(getattr(fp._module_info.module, fp._module_info.param_name, None)) for fp in group.fsdp_params}
            if owned & params and all(group.mesh_info.mesh is not m for m in meshes):
                meshes.append(group.mesh_info.mesh)
    return meshes


def warn_fsdp_reduces_twice(example_inputs: Sequence[Any], pg, grad_reduce: str) -> bool:
    """Warn once per sequence group (its rank 0) when ``grad_reduce="sum"`` and FSDP2 over
    ranks that span ``pg`` manages the frame's parameters. Returns whether that is the case."""
    if grad_reduce != "sum" or pg is None or pg.group_name in _warned_groups:
        return False
    group_ranks = set(dist.get_process_group_ranks(pg))
    spanning = [m for m in fsdp_meshes_of(example_inputs) if group_ranks <= set(m.mesh.flatten().tolist())]
    if not spanning:
        return False
    _warned_groups.add(pg.group_name)
    if dist.get_rank(pg) == 0:
        sp, span = len(group_ranks), spanning[0].mesh.numel()
        warnings.warn(
            f"seqpar: FSDP2 (fully_shard over {span} ranks) manages this frame's parameters and spans the sequence "
            f"group ({sp} ranks), and SEQPAR_GRAD_REDUCE=sum: every gradient is summed by seqpar over the sequence "
            f"group and reduced again by FSDP (exact, but twice). To reduce once, set SEQPAR_GRAD_REDUCE=none "
            f"(or backend(grad_reduce='none')) and multiply the sequence loss by {sp} (the sequence degree) before "
            f"backward(), or call set_gradient_divide_factor({span // sp}) (the dp degree) and "
            f"set_force_sum_reduction_for_comms(True) on every FSDP module instead", stacklevel=4)
    return True
