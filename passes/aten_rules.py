"""The generic sharding rule of the compiled path: an op with no torch-level rule, decomposed to
ATen on its example values, each piece planned by the sharding core and emitted.

Reads ``node.meta["example_value"]`` of the node and its inputs, and the placements the rewrite
has given its inputs (``ShardingContext.place``). Writes, into the new graph, the ATen pieces of
the op computed on local shards (``node.meta["seqpar_placement"]`` on each), and returns the
placement of the op's result like any rule (``sharding_rules.py``).

Why a per-node decomposition (not a whole ATen-level graph): the torch-level graph is what the
rest of seqpar reads (attention patterns, the FFN and checkpointing passes, the dump), and almost
every op of a real model already has a rule there; only an op without one pays for a ``make_fx``
of one call on fake tensors (milliseconds).

Each piece's plan comes from ``runtime/sharding/ops.py`` — the same core ``SequenceShard``'s
eager dispatch uses — so an op shards alike inside a frame and between frames: seqpar's own
rules where the layout matters (views of merged dims, advanced indexing, position-aware ops
along the sequence), DTensor's strategy elsewhere. Here the plan becomes graph nodes: a
replicated operand sliced in the layout (``seqpar::shard_sequence``: its gradient is gathered),
a replicated operand that requires grad and meets shards gets its gradient summed over the group,
and a partial result one all-reduce.
"""
from __future__ import annotations

import operator
from math import prod

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from seqpar_compiler.runtime.grad_collectives import all_reduce_to_replicated, sum_grad_over_group

from seqpar_compiler.runtime.sharding.dtensor_bridge import TENSOR, NoStrategy
from seqpar_compiler.runtime.sharding.ops import Refusal, TensorArg, plan_op
from seqpar_compiler.runtime.sharding.placements import Partial, Replicate, SeqRange, Shard, seq_factors

from .range_layout import local_count, take_part_rows

__all__ = ["decomposed_rule", "DECOMPOSITIONS"]

aten = torch.ops.aten
shard_sequence_op = torch.ops.seqpar.shard_sequence.default

# ATen ops DTensor has no strategy for, decomposed into ones it has (SDPA never reaches here:
# attention has its own rule).
DECOMPOSITIONS = {}
for _op in (aten.polar.default, aten.narrow.default, aten.repeat_interleave.self_int,
            aten.tensor_split.indices, aten.tensor_split.sections, aten.movedim.int, aten.logsumexp.default,
            aten.unflatten.int, aten.flatten.using_ints):
    try:
        from torch._decomp import decomposition_table as _table
        if _op in _table:
            DECOMPOSITIONS[_op] = _table[_op]
    except Exception:  # noqa: BLE001 - an op this torch does not have
        pass


def _polar(abs_, angle):
    return torch.complex(abs_ * torch.cos(angle), abs_ * torch.sin(angle))


DECOMPOSITIONS[aten.polar.default] = _polar

class _Refuse(Exception):
    pass


# Test-only switches restoring the behaviour before two crash fixes (real-code tier): trace on
# meta tensors (factories inside the op then carry device=meta into the emitted graph, and a tensor
# made from a Python list, ``x[..., [-2], :]``, becomes a meta constant), and emit a traced
# constant as a call of its attribute name. Never set outside tests.
_TRACE_ON_META = False
_EMIT_CONSTANTS_AS_CALLS = False


def _example_like(ex, mode):
    """A fake tensor of ``ex``'s shape, strides, dtype and *device* in the private ``mode``.

    Why not meta: the pieces are emitted into the real graph as traced, so every factory inside
    the op (``arange``, ``one_hot``'s ``zeros``, a list index turned into a tensor) records the
    tracing device; on meta the emitted graph then mixes meta and cpu/cuda tensors and the inner
    compile fails (``FakeTensorDeviceMismatchError``), and a constant made from a list loses its
    values. A private fake mode (not Dynamo's) leaves the frame's shape env untouched."""
    if not isinstance(ex, torch.Tensor):
        return ex
    if _TRACE_ON_META:
        return torch.empty_strided(ex.shape, ex.stride(), dtype=ex.dtype, device="meta")
    with mode:
        return torch.empty_strided(ex.shape, ex.stride(), dtype=ex.dtype, device=ex.device)


def _decompose(ctx, node: fx.Node) -> tuple[fx.GraphModule, list[fx.Node]]:
    """One call of ``node``'s op, traced to ATen on fake tensors shaped like its example values
    (on their device; tensors made from Python lists keep their values as constants)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    inputs = node.all_input_nodes
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    metas = [_example_like(ctx.example(a), mode) for a in inputs]
    if any(not isinstance(m, torch.Tensor) for m in metas):
        raise _Refuse("an input that is not a tensor")

    def call(*tensors):
        env = dict(zip(inputs, tensors))
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)
    return make_fx(call, decomposition_table=DECOMPOSITIONS)(*metas), inputs


def _shape(p) -> tuple[int, ...]:
    return tuple(p.meta["val"].shape)


def decomposed_rule(ctx, node: fx.Node):
    """Shard ``node`` piece by piece (module docstring); a string when some piece cannot be."""
    try:
        gm, inputs = _decompose(ctx, node)
    except _Refuse as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - an op make_fx cannot trace on fake tensors (data-dependent)
        return f"it does not decompose on fake tensors ({type(err).__name__})"
    try:
        return _shard_pieces(ctx, node, gm, inputs)
    except (_Refuse, NoStrategy) as err:
        return str(err)


def _shard_pieces(ctx, node, gm, inputs):
    vals: dict[fx.Node, object] = {}
    place: dict[fx.Node, object] = {}
    # replicated pieces computed from a replicated input that requires grad: where one meets a
    # sharded piece, its gradient is partial and must be summed over the group (docs/architecture.md)
    olds: dict[fx.Node, object] = {}
    placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
    for p, old in zip(placeholders, inputs):
        vals[p], place[p] = ctx.env[old], ctx.placement_of(old)
        ex = ctx.example(old)
        if not isinstance(place[p], Shard) and isinstance(ex, torch.Tensor) and ex.requires_grad:
            olds[p] = old
    result = None
    for p in gm.graph.nodes:
        if p.op == "placeholder":
            continue
        if p.op == "output":
            result = p.args[0]
            break
        if p.op == "get_attr":            # a constant the op made (a Python list index as a tensor)
            vals[p], place[p] = _constant_piece(ctx, gm, p), Replicate()
            continue
        if p.target is operator.getitem:
            src, i = p.args
            place[p] = place[src][i] if isinstance(place[src], tuple) else Replicate()
            vals[p] = ctx.emit(operator.getitem, (vals[src], i), placement=place[p])
            if src in olds:
                olds[p] = None
            continue
        vals[p], place[p] = _piece(ctx, p, vals, place, olds)
        vals[p].meta["seqpar_placement"] = place[p]
    if isinstance(result, (list, tuple)):
        if not isinstance(ctx.example(node), (list, tuple)):
            raise _Refuse("a decomposition with several outputs for one tensor")
        pls = tuple(place[r] for r in result)
        return ctx.emit(tuple, ([vals[r] for r in result],), placement=pls), pls
    return vals[result], place[result]


def _constant_piece(ctx, gm: fx.GraphModule, p: fx.Node) -> fx.Node:
    """The traced constant ``p`` as an attribute of the rewritten graph (registered with the
    rewrite's other constants), replicated: it is the same value on every rank."""
    if _EMIT_CONSTANTS_AS_CALLS:
        return ctx.emit(p.target, (), {}, Replicate())
    value = getattr(gm, p.target)
    if value.device.type == "meta":
        raise _Refuse("a constant the op makes lost its value on meta tensors")
    name = f"_seqpar_aten_constant_{len(ctx.constants)}"
    ctx.constants[name] = value
    return ctx.emit(name, (), op="get_attr", placement=Replicate())


def _shared_part(place, tensor_args) -> SeqRange | None:
    """The one part of the sequence the piece's sharded operands hold (a chunk: ``SeqRange``),
    None when they are whole shards; a mix, or chunks of merged sequences, is refused."""
    shards = [place.get(a) for a in tensor_args if isinstance(place.get(a), Shard)]
    parts = {(pl.start, pl.stop, pl.outer) for pl in shards if isinstance(pl, SeqRange)}
    if not parts:
        return None
    if len(parts) > 1 or len(parts) == 1 and any(not isinstance(pl, SeqRange) for pl in shards):
        raise _Refuse("operands hold different parts of the sequence")
    part = next(pl for pl in shards if isinstance(pl, SeqRange))
    if part.outer != 1 or type(part) is not SeqRange:
        raise _Refuse("a chunk of merged sequences, or pieces in no layout's order")
    return part


def _piece(ctx, p: fx.Node, vals, place, olds):
    """One ATen piece: its plan from the sharding core (``runtime/sharding/ops.py``), emitted.
    On a part of the sequence (``SeqRange``) the core plans with the part's length and this
    rank's count of its rows, as the eager path does for a part between frames."""
    tensor_args = tensor_args_in_order(p)
    part = _shared_part(place, tensor_args)

    def as_arg(a):
        pl = place.get(a)
        return TensorArg(_shape(a), a.meta["val"].dtype, pl if isinstance(pl, Shard) else Replicate())
    args, kwargs = fx.node.map_arg((p.args, p.kwargs), as_arg)
    vals_out = p.meta["val"] if isinstance(p.meta["val"], (list, tuple)) else [p.meta["val"]]
    out_shapes = tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in vals_out)
    try:
        plan = plan_op(p.target, args, kwargs, S=ctx.S if part is None else part.length, P=ctx.P,
                       group_name=ctx.group_name, out_shapes=out_shapes, schedule=ctx.schedule,
                       local_len=None if part is None else local_count(ctx, part))
    except Refusal as err:
        raise _Refuse(str(err)) from err
    if not any(isinstance(place.get(a), Shard) for a in tensor_args):
        if any(a in olds for a in tensor_args):
            olds[p] = None                     # needs a gradient sum where it meets shards
        plain = lambda a: vals[a]              # noqa: E731
        return ctx.emit(p.target, fx.node.map_arg(p.args, plain), fx.node.map_arg(p.kwargs, plain),
                        Replicate()), Replicate()
    pre, post = plan.merged
    operands = iter(zip(tensor_args, plan.operands))

    def fill(v):
        if v is TENSOR:
            a, how = next(operands)
            if part is not None and isinstance(how, tuple):
                return _slice_to_part(ctx, a, vals, olds, how[1], pre, post, part)
            return _operand(ctx, a, how, vals, olds, pre, post)
        if isinstance(v, (list, tuple)):
            return type(v)(fill(x) for x in v)
        return v
    new_args = tuple(fill(v) for v in plan.args)
    new_kwargs = {k: fill(v) for k, v in plan.kwargs.items()}
    single = not isinstance(p.meta["val"], (list, tuple))
    outs = plan.outputs
    if part is not None:                 # the part's range carried to where the core put the sequence
        outs = tuple(part.moved(o) if isinstance(o, Shard) else o for o in outs)
    new = ctx.emit(plan.call or p.target, new_args, new_kwargs, outs[0] if single else outs)
    if plan.call is not None:            # a halo exchange or a carry across ranks
        ctx.collectives.append(f"{plan.call} for {p.target}: {new.name}")
    if single and isinstance(outs[0], Partial):
        return _reduce_partial(ctx, new, outs[0].reduce, p), Replicate()
    if not single and any(isinstance(o, Partial) for o in outs):
        return _reduce_partial_outputs(ctx, new, outs, p)
    return new, (outs[0] if single else outs)


def _reduce_partial_outputs(ctx, new, outs, p):
    """Several outputs, some partial (a convolution's backward: the input's gradient a shard,
    the weight's a partial sum): each partial one reduced, the outputs regrouped."""
    parts, placed = [], []
    for i, o in enumerate(outs):
        if o is None and p.meta["val"][i] is None:
            parts.append(None)
            placed.append(None)
            continue
        item = ctx.emit(operator.getitem, (new, i), placement=None if isinstance(o, Partial) else o)
        parts.append(_reduce_partial(ctx, item, o.reduce, p) if isinstance(o, Partial) else item)
        placed.append(Replicate() if isinstance(o, Partial) else o)
    return ctx.emit(tuple, (parts,), placement=tuple(placed)), tuple(placed)


def tensor_args_in_order(p: fx.Node) -> list[fx.Node]:
    found = []
    fx.node.map_arg((p.args, p.kwargs), found.append)
    return found


def _operand(ctx, a, how, vals, olds, pre, post):
    """One tensor argument as the plan wants it: a shard as it is, a replicated value whole
    (its gradient summed over the group where it meets shards) or sliced in the layout."""
    if how == "local":
        return vals[a]
    if how == "whole":
        if a not in olds or ctx.grad_reduce == "none":
            return vals[a]
        if olds[a] is not None:
            return ctx.weight(olds[a])
        key = ("grad-summed", a)
        if key not in vals:
            vals[key] = ctx.emit(sum_grad_over_group, (vals[a], ctx.group_name), placement=Replicate())
            ctx.collectives.append(f"grad all-reduce {a.name}")
        return vals[key]
    return _slice(ctx, vals[a], _shape(a), how[1], pre, post)


def _slice(ctx, new, shape, d, pre, post):
    """A replicated value's part in the layout along dim ``d`` (its gradient is gathered)."""
    if pre == 1 and post == 1:
        return ctx.emit(shard_sequence_op, (new, d, ctx.schedule, ctx.group_name), placement=Shard(d))
    shape = list(shape)
    split = shape[:d] + list(seq_factors(pre, post, ctx.S)) + shape[d + 1:]
    local = shape[:d] + [prod(seq_factors(pre, post, ctx.S // ctx.P))] + shape[d + 1:]
    unmerged = ctx.emit(aten.reshape.default, (new, split))
    sliced = ctx.emit(shard_sequence_op, (unmerged, d + 1, ctx.schedule, ctx.group_name))
    return ctx.emit(aten.reshape.default, (sliced, local), placement=Shard(d, pre, post))


def _slice_to_part(ctx, a, vals, olds, d, pre, post, part: SeqRange):
    """A replicated value's rows of the part along dim ``d`` (merged (pre, L, post)). Each rank
    takes other rows, so where the value needs a gradient it is summed over the group first."""
    new = vals[a]
    if a in olds and ctx.grad_reduce != "none":
        new = ctx.weight(olds[a]) if olds[a] is not None else ctx.emit(
            sum_grad_over_group, (new, ctx.group_name), placement=Replicate())
    return take_part_rows(ctx, new, list(_shape(a)), d, SeqRange(d, pre, post, part.start, part.stop),
                          a.meta["val"].device)


def _reduce_partial(ctx, new, op: str, p):
    ctx.collectives.append(f"all-reduce {p.name}")
    if op in ("sum", "avg"):
        total = ctx.emit(all_reduce_to_replicated, (new, ctx.group_name), placement=Replicate())
        return total if op == "sum" else ctx.emit(operator.truediv, (total, ctx.P), placement=Replicate())
    raise _Refuse(f"{p.target}: a {op} across ranks has no differentiable all-reduce here")
