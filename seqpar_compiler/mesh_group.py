"""The sequence-parallel group named by a DeviceMesh: ``backend(mesh=..., mesh_dim=...)``.

torchtitan and FSDP2 users build one ``DeviceMesh`` with named dims (``("dp", "cp")``,
``("dp_shard", "cp")``) and hand each parallelism its dim; this lets seqpar take its group the
same way instead of a raw process group or ``SEQPAR_DEGREE``:

    world_mesh = init_device_mesh("cuda", (dp, sp), mesh_dim_names=("dp", "sp"))
    torch.compile(model, backend=seqpar_compiler.backend(mesh=world_mesh["sp"]))
    torch.compile(model, backend=seqpar_compiler.backend(mesh=world_mesh, mesh_dim="sp"))

The group is resolved when the backend is made (not at the first compile), so a wrong name or
a mesh this rank is not part of fails where the user wrote it.
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["resolve_sequence_group"]


def resolve_sequence_group(group: dist.ProcessGroup | None = None, mesh: Any = None,
                           mesh_dim: str | int | None = None) -> dist.ProcessGroup | None:
    """The explicit sequence-parallel group from ``group=`` or ``mesh=`` (+ ``mesh_dim=``), or
    None when neither is given (the backend then uses the default group or ``SEQPAR_DEGREE``).

    Args:
        group: a process group (exclusive with ``mesh``).
        mesh: a ``DeviceMesh``; 1-D (``world_mesh["sp"]``), or any number of dims with ``mesh_dim``.
        mesh_dim: the name (or index) of the sequence dim of a multi-dim ``mesh``.

    Raises:
        ValueError: both ``group`` and ``mesh``; ``mesh_dim`` without ``mesh``; a multi-dim mesh
            without ``mesh_dim``; a dim name the mesh does not have; this rank not in the mesh.
        TypeError: ``mesh`` is not a DeviceMesh.
    """
    if mesh is None:
        if mesh_dim is not None:
            raise ValueError(f"seqpar backend: mesh_dim={mesh_dim!r} needs mesh= (a DeviceMesh); "
                             "pass backend(mesh=world_mesh, mesh_dim=...) or backend(mesh=world_mesh[...])")
        return group
    if group is not None:
        raise ValueError("seqpar backend: give the sequence-parallel group once, as group= (a ProcessGroup) "
                         "or as mesh= (a DeviceMesh, with mesh_dim= if it has several dims), not both")
    from torch.distributed.device_mesh import DeviceMesh
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"seqpar backend: mesh= must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    names = mesh.mesh_dim_names
    if mesh_dim is None:
        if mesh.ndim != 1:
            raise ValueError(f"seqpar backend: mesh has {mesh.ndim} dims {_dims(names, mesh.ndim)}: name the "
                             "sequence-parallel one with mesh_dim= (or pass the 1-D sub-mesh, mesh[name])")
        mesh_dim = 0
    elif isinstance(mesh_dim, str):
        if not names or mesh_dim not in names:
            raise ValueError(f"seqpar backend: mesh_dim={mesh_dim!r} is not a dim of the mesh; allowed: "
                             f"{_dims(names, mesh.ndim)}")
    elif not (isinstance(mesh_dim, int) and 0 <= mesh_dim < mesh.ndim):
        raise ValueError(f"seqpar backend: mesh_dim={mesh_dim!r} is not a dim of the mesh; allowed: "
                         f"{_dims(names, mesh.ndim)}")
    if mesh.get_coordinate() is None:
        raise ValueError(f"seqpar backend: this rank ({dist.get_rank()}) is not in the mesh "
                         f"{mesh.mesh.flatten().tolist()}: make the backend with the mesh (or sub-mesh) "
                         "that holds this rank")
    return mesh.get_group(mesh_dim)


def _dims(names, ndim: int) -> str:
    return ", ".join(repr(n) for n in names) if names else ", ".join(str(i) for i in range(ndim))
