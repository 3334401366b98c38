"""Every private DTensor name seqpar uses, in one place (torch 2.11 on the GPU machines, 2.13 here).

seqpar takes the sharding rule of every op whose rule does not depend on the sequence layout from
DTensor's strategy registry (``DTensor._op_dispatcher.sharding_propagator``). That registry is
private: its import paths and the fields of ``OutputSharding`` have moved between releases. The
rest of ``passes/`` talks to it only through ``propagate`` below, in seqpar's own terms: an ATen
op, its arguments with tensors replaced by ``ArgSpec`` (shape, dtype, sharded dim or None), and
an answer saying where each output is sharded, which inputs DTensor wants resharded, and the
arguments with shape arguments made local.

Shapes: every shape is a *global* shape; ``Shard(d)`` on a 1-D mesh of the group size P. A
symbolic size (a frame Dynamo traces once for every length) reaches DTensor as its example value
and never comes back from it: DTensor runs the op on example-sized fake tensors, so a symbolic
size argument beside them would be compared with an example size (a guard on one length), and a
size DTensor derives from the example is that length's number. The caller gets its own symbolic
arguments back, and ``Propagation.shape_arg`` names the one DTensor would have made local, for
the caller to compute from the symbolic output shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist

__all__ = ["ArgSpec", "Propagation", "NoStrategy", "TENSOR", "propagate", "has_strategy", "is_symbolic"]

TENSOR = object()   # marks where a tensor argument goes in ``Propagation.args``


class NoStrategy(Exception):
    """DTensor has no sharding strategy for this op (or could not apply it)."""


@dataclass(frozen=True)
class ArgSpec:
    """A tensor argument as DTensor sees it: global ``shape``, ``dtype``, and the dim sharded
    over the group (``None``: replicated)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: int | None


@dataclass(frozen=True)
class Propagation:
    """DTensor's answer for one op.

    Attributes:
        outputs: per output tensor (a flat tuple, one entry for a single tensor):
            ``("shard", d)``, ``("replicate",)``, ``("partial", reduce_op)`` or ``None`` for a
            non-tensor output.
        inputs: per tensor argument (in ``args`` order, flattened), the placement DTensor wants
            it in: ``("shard", d)`` / ``("replicate",)`` / ``("partial", op)``.
        args: the positional arguments with shape arguments made local, each tensor argument
            replaced by ``TENSOR`` (fill them in, in order).
        kwargs: likewise.
        shape_arg: the index of the positional argument that is the output's shape (``expand``,
            ``view``, ``new_zeros``, ...) when the output is sharded: DTensor's local value
            there is computed from example sizes, so a caller with symbolic sizes computes it
            itself (the global output shape with the sharded dim divided by P); else None.
        stride_arg: likewise for a stride argument (``new_empty_strided``).
    """

    outputs: tuple
    inputs: tuple
    args: tuple
    kwargs: dict
    shape_arg: int | None = None
    stride_arg: int | None = None


def _imports():
    # torch 2.11 and 2.13 both keep these names here; a move shows up as one ImportError here.
    from torch.distributed.tensor import DeviceMesh, DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor._op_schema import OpSchema
    return DeviceMesh, DTensor, Partial, Replicate, Shard, DTensorSpec, TensorMeta, OpSchema


@lru_cache(maxsize=None)
def _mesh(P: int, ranks: tuple[int, ...]):
    DeviceMesh = _imports()[0]
    return DeviceMesh("cpu", list(ranks), _init_backend=False)


def _mesh_for(P: int, group_name: str | None):
    if not dist.is_initialized():
        raise NoStrategy("DTensor's sharding strategies need an initialised process group")
    ranks = tuple(range(P))
    if group_name is not None:
        try:
            from torch.distributed.distributed_c10d import _resolve_process_group
            ranks = tuple(dist.get_process_group_ranks(_resolve_process_group(group_name)))
        except Exception:  # noqa: BLE001 - a group name torch cannot resolve: the first P ranks
            pass
    return _mesh(P, ranks)


def _example_size(s) -> int:
    """A size as a plain int without specialising it: a symbolic size (a frame traced for every
    length) gives its example value. DTensor's placements depend on which dims are sharded, not
    on their lengths; ``int(s)`` would add a guard on the length and recompile the frame at every
    new one."""
    if isinstance(s, torch.SymInt):
        hint = getattr(s.node, "hint", None)
        return int(hint) if hint is not None else int(s)
    return int(s)


def is_symbolic(value) -> bool:
    """Whether ``value`` (a number or a nest of lists and tuples) holds a symbolic number."""
    if isinstance(value, (list, tuple)):
        return any(is_symbolic(v) for v in value)
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))


def _example_value(value):
    """A non-tensor argument with every symbolic number replaced by its example value."""
    if isinstance(value, (list, tuple)):
        return type(value)(_example_value(v) for v in value)
    if isinstance(value, torch.SymInt):
        return _example_size(value)
    if isinstance(value, (torch.SymFloat, torch.SymBool)):
        hint = getattr(value.node, "hint", None)
        return hint if hint is not None else (float(value) if isinstance(value, torch.SymFloat) else bool(value))
    return value


def _contiguous_stride(shape):
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def _placement_tuple(p) -> tuple:
    _, _, Partial, Replicate, Shard, *_ = _imports()
    if type(p) is Shard:               # _StridedShard subclasses Shard: not a contiguous shard
        return ("shard", p.dim)
    if isinstance(p, Replicate):
        return ("replicate",)
    if isinstance(p, Partial):
        return ("partial", p.reduce_op)
    return ("other", str(p))


def _spec_placement(spec) -> tuple:
    return _placement_tuple(spec.placements[0])


def has_strategy(op) -> bool:
    """Whether DTensor registers any sharding strategy for the ATen op ``op``."""
    DTensor = _imports()[1]
    prop = DTensor._op_dispatcher.sharding_propagator
    tables = [getattr(prop, name, {}) for name in ("op_strategy_funcs", "op_single_dim_strategy_funcs",
                                                    "op_to_rules")]
    return any(op in t for t in tables)


def propagate(op, args: tuple, kwargs: dict, P: int, group_name: str | None = None) -> Propagation:
    """Ask DTensor how ``op`` shards when its tensor arguments are placed as their ``ArgSpec``s say.

    Raises ``NoStrategy`` when DTensor has no rule or its rule raised (a shape it refuses).
    """
    if not has_strategy(op):
        # DTensor would otherwise propagate through the op's decomposition: slow (SDPA's runs
        # for minutes) and, for the ops seqpar cares about, never the layout's answer
        raise NoStrategy(f"DTensor registers no strategy for {op}")
    _, DTensor, _, Replicate, Shard, DTensorSpec, TensorMeta, OpSchema = _imports()
    mesh = _mesh_for(P, group_name)

    def to_spec(a):
        if isinstance(a, ArgSpec):
            pl = Replicate() if a.shard is None else Shard(a.shard)
            shape = tuple(_example_size(d) for d in a.shape)
            return DTensorSpec(mesh, (pl,), TensorMeta(torch.Size(shape), _contiguous_stride(shape), a.dtype))
        if isinstance(a, (list, tuple)) and any(isinstance(x, ArgSpec) for x in a):
            return type(a)(to_spec(x) for x in a)
        return _example_value(a)
    schema = OpSchema(op, tuple(to_spec(a) for a in args), {k: to_spec(v) for k, v in kwargs.items()})
    prop = DTensor._op_dispatcher.sharding_propagator
    try:
        out = prop.propagate_op_sharding(schema)
    except Exception as err:  # noqa: BLE001 - NotImplementedError, or a rule refusing the shapes
        raise NoStrategy(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    spec = out.output_spec
    specs = spec if isinstance(spec, (list, tuple)) else (spec,)
    outputs = tuple(None if s is None else _spec_placement(s) for s in specs)
    suggested = out.redistribute_schema or schema
    flat_in = [s for s in _flat(suggested.args_schema) if isinstance(s, DTensorSpec)]
    inputs = tuple(_spec_placement(s) for s in flat_in)
    use_suggested = out.redistribute_schema is not None and getattr(out, "use_val_from_redistribute_schema", True)
    src = suggested if use_suggested else schema
    def slot(a, orig):
        if isinstance(a, DTensorSpec):
            return TENSOR
        if is_symbolic(orig):
            return orig    # DTensor saw its example value: ours stays symbolic (module docstring)
        if isinstance(orig, (int, float, bool)) and not isinstance(a, type(orig)):
            return orig    # DTensor canonicalises some scalars (squeeze's dim becomes a tuple): keep ours
        if isinstance(a, (list, tuple)):
            return type(a)(slot(x, None) for x in a)
        return a
    orig_args = list(args) + [None] * (len(src.args_schema) - len(args))
    shape_arg = stride_arg = None
    if any(o is not None and o[0] == "shard" for o in outputs):
        shape_arg, stride_arg = _shape_and_stride_args(prop, op)
    rewritten = [i for i, (a, o) in enumerate(zip(src.args_schema, orig_args))
                 if is_symbolic(o) and not _same(a, _example_value(o))]
    rewritten += [k for k, v in src.kwargs_schema.items() if is_symbolic(kwargs.get(k))
                  and not _same(v, _example_value(kwargs.get(k)))]
    if set(rewritten) - {shape_arg, stride_arg}:
        # a symbolic argument DTensor changed for a reason this module does not know: its value
        # for the example would be one length's number in a graph traced for every length
        raise NoStrategy(f"DTensor rewrote the symbolic arguments {rewritten} of {op}")
    return Propagation(outputs, inputs, tuple(slot(a, o) for a, o in zip(src.args_schema, orig_args)),
                       {k: slot(v, kwargs.get(k)) for k, v in src.kwargs_schema.items()}, shape_arg, stride_arg)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _shape_and_stride_args(prop, op) -> tuple[int | None, int | None]:
    """Which positional arguments of ``op`` DTensor rewrites from the global output shape (and
    stride) to the local one when the output is sharded (its ``op_to_shape_and_stride_idx``)."""
    idx = getattr(prop, "op_to_shape_and_stride_idx", {}).get(op)
    if idx is None:
        return None, None
    return idx if isinstance(idx, tuple) else (idx, None)


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a
