"""Counting activation-sized allocations: a structural memory check that does not time or
sample RSS.

``count_new_buffers(fn, numel)`` runs ``fn`` under a dispatch mode and counts the ATen op
results of at least ``numel`` elements whose storage is new (not a view of, or written into,
an argument of the op). Calling the ring's Python loops directly (not through the custom op,
whose body a mode does not enter) this sees every buffer the ring allocates and every result a
kernel returns; it does not see memory private to one ATen kernel.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _Counter(TorchDispatchMode):
    def __init__(self, numel: int):
        super().__init__()
        self.numel = numel
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.numel() >= self.numel
                    and t.untyped_storage().data_ptr() not in seen):
                self.ops.append(func.__name__)
        return out


def count_new_buffers(fn, numel: int):
    """(fn's result, names of the ops that allocated a buffer of >= numel elements)."""
    with _Counter(numel) as counter:
        result = fn()
    return result, counter.ops
