"""``GatheredView``: a view of a ``SequenceShard`` that could not stay a shard.

Why: in eager PyTorch a view and its base share storage, so a write into either is seen by both.
A view that picks positions of the sequence (``x[:, -1]``, ``x[:, 3:9]`` under zigzag, a view
that splits the sequence dim) has no shard form: the eager rules compute it from the gathered
sequence, a new tensor. Handing that out as a plain tensor would shard one side of an alias: a
write into it would never reach the shard, and a write into the shard would leave it stale,
both without an error. A ``GatheredView`` holds the gathered values and reads like a plain
tensor (every op on it runs on those values and returns plain tensors, views of it stay
``GatheredView``s), but a write into it, or a read after its ``SequenceShard`` was written,
raises an error that says what to do instead.

Staleness is read from the shard's version counter (every in-place op bumps it): the view keeps
a weak reference to the shard and the version it had when the view was made.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["GatheredView", "check_detached", "detach_from", "is_view_op", "written_arguments"]


def is_view_op(func) -> bool:
    """An ATen op whose result aliases an input without writing it (``Tensor(a)`` returns)."""
    schema = func._schema
    return (any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
            and not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments))


def written_arguments(func, args, kwargs) -> list:
    """The arguments an ATen op writes into (``Tensor(a!)`` in its schema)."""
    found = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            found.extend(value if isinstance(value, (list, tuple)) else [value])
    return [v for v in found if isinstance(v, Tensor)]


def _version(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:          # inference tensors have no version counter
        return None


def detach_from(view: Tensor, base: Tensor | tuple) -> Tensor:
    """Mark ``view`` as holding a copy of what a view of ``base`` would hold (module docstring):
    a write into it, or a read after ``base`` was written, raises from then on."""
    view._detached_source = base if isinstance(base, tuple) else (weakref.ref(base), _version(base))
    return view


def check_detached(func, args, kwargs) -> None:
    """Refuse a read of a detached view whose base was written since, and any write into one."""
    flat = tree_flatten((args, kwargs))[0]
    for t in flat:
        source = getattr(t, "_detached_source", None) if isinstance(t, Tensor) else None
        if source is None:
            continue
        ref, taken_at = source
        base = ref()
        now = None if base is None else _version(base)
        if taken_at is not None and now is not None and now != taken_at:
            raise RuntimeError(
                "seqpar: this tensor is a view of a sequence-sharded tensor whose values had to be copied (it "
                "picks positions of the sequence, or its shard could not be viewed in place); the sharded "
                "tensor was written after the view was taken, so the view no longer shows it. Take the view "
                "again after the write, or make a plain copy first (full = x.full_tensor()) and view that")
    if any(getattr(w, "_detached_source", None) is not None for w in written_arguments(func, args, kwargs)):
        raise RuntimeError(
            f"seqpar: {func} writes into a view of a sequence-sharded tensor whose values had to be copied (it "
            f"picks positions of the sequence, or its shard could not be viewed in place), so the write would "
            f"not reach the sharded tensor. Write into a plain copy instead (full = x.full_tensor(); "
            f"full[...] = ...), or write into the sharded tensor with an op that keeps the whole sequence "
            f"(a mask, torch.where)")


class GatheredView(torch.Tensor):
    """The gathered values of a sequence-picking view of a SequenceShard (module docstring).

    ``_full``: the plain values; ``_detached_source``: a weak reference to the shard and its
    version when the view was made."""

    _full: Tensor
    _detached_source: tuple
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, full: Tensor, source: Tensor | tuple):
        out = torch.Tensor._make_wrapper_subclass(cls, full.shape, strides=full.stride(), dtype=full.dtype,
                                                  device=full.device, requires_grad=full.requires_grad)
        out._full = full
        return detach_from(out, source)


    def __repr__(self, *, tensor_contents=None) -> str:
        return f"GatheredView({self._full!r})"

    def tolist(self):
        return self._full.tolist()

    def numpy(self, *args, **kwargs):
        return self._full.detach().numpy(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        check_detached(func, args, kwargs)
        plain_args, plain_kwargs = tree_map(lambda a: a._full if isinstance(a, GatheredView) else a, (args, kwargs))
        out = func(*plain_args, **plain_kwargs)
        if is_view_op(func) and args and isinstance(args[0], GatheredView):
            source = args[0]._detached_source
            return tree_map(lambda o: GatheredView(o, source) if isinstance(o, Tensor) else o, out)
        return out
