"""The generic sharding rule: an op with no hand-written rule, decomposed to ATen on its example
values, each piece sharded by DTensor's strategy for it (issue 12, design (b)).

Reads ``node.meta["example_value"]`` of the node and its inputs, and the placements the rewrite
has given its inputs (``ShardingContext.place``). Writes, into the new graph, the ATen pieces of
the op computed on local shards (``node.meta["seqpar_placement"]`` on each), and returns the
placement of the op's result like any rule (``sharding_rules.py``).

Why a per-node decomposition (not a whole ATen-level graph): the torch-level graph is what the
rest of seqpar reads (attention patterns, the FFN and checkpointing passes, the dump), and almost
every op of a real model already has a rule there; only an op without one pays for a ``make_fx``
of one call on meta tensors (milliseconds). See docs/how_it_works.md "Where rules come from".

What stays seqpar's (never taken from DTensor): DTensor's ``Shard`` means contiguous chunks, and
zigzag / striped are not contiguous. An ATen piece is taken from DTensor only when it keeps the
sequence on a dim of the same size and is equivariant under any permutation of the sequence
positions (``_LAYOUT_OPS`` lists the ATen ops whose result depends on where a position sits:
scans, rolls, flips, triangles, slices, index ops along the sequence). Views go through seqpar's
own view rule (``placement.view_placement``: merged batch×sequence dims, and a view that splits
the sequence is refused). A reduction over the sequence comes back ``Partial``: sum, mean (equal
shares) and max/min are permutation invariant and become one all-reduce; ``nll_loss`` (whose mean
counts ignored targets) keeps seqpar's cross-entropy rule.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from seqpar_compiler.runtime.grad_collectives import all_reduce_to_replicated, sum_grad_over_group

from .dtensor_compat import TENSOR, ArgSpec, NoStrategy, propagate
from .placement import Replicate, Shard, local_view_shape, view_placement

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

_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
# position-aware ATen ops: their result depends on where a position sits in the dim
_LAYOUT_OPS = {aten.roll.default, aten.flip.default, aten.cumsum.default, aten.cumprod.default,
               aten.logcumsumexp.default, aten.cummax.default, aten.cummin.default, aten.sort.default,
               aten.sort.stable, aten.topk.default, aten.tril.default, aten.triu.default, aten.diff.default,
               aten.slice.Tensor, aten.narrow.default, aten.unfold.default, aten.constant_pad_nd.default,
               aten.nll_loss_forward.default, aten.nll_loss2d_forward.default, aten.index_select.default,
               aten.gather.default, aten.scatter.src, aten.scatter_add.default, aten.index.Tensor,
               aten.select.int, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int,
               aten.as_strided.default, aten.diagonal.default}
# of those, the ones that are permutation-equivariant when the sequence dim is not the dim they act on
_DIM_ARG = {aten.roll.default: 2, aten.flip.default: 1, aten.cumsum.default: 1, aten.cumprod.default: 1,
            aten.logcumsumexp.default: 1, aten.cummax.default: 1, aten.cummin.default: 1, aten.sort.default: 1,
            aten.topk.default: 3, aten.diff.default: 2, aten.slice.Tensor: 1, aten.narrow.default: 1,
            aten.unfold.default: 1, aten.index_select.default: 1, aten.gather.default: 1, aten.select.int: 1,
            aten.split.Tensor: 2, aten.split_with_sizes.default: 2, aten.unbind.int: 1,
            aten.scatter.src: 1, aten.scatter_add.default: 1}
_DIM_DEFAULT = {aten.sort.default: -1, aten.topk.default: -1, aten.diff.default: -1, aten.slice.Tensor: 0,
                aten.split.Tensor: 0, aten.split_with_sizes.default: 0, aten.unbind.int: 0}


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
    # sharded piece, its gradient is partial and must be summed over the group (DESIGN §1)
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


def _piece(ctx, p: fx.Node, vals, place, olds):
    tensor_args = p.all_input_nodes
    shards = {a: place[a] for a in tensor_args if isinstance(place.get(a), Shard)}

    def plain(a):
        return vals[a]
    if not shards:
        if any(a in olds for a in tensor_args):
            olds[p] = None                     # needs a gradient sum where it meets shards
        return ctx.emit(p.target, fx.node.map_arg(p.args, plain), fx.node.map_arg(p.kwargs, plain),
                        Replicate()), Replicate()
    kinds = {(s.pre, s.post) for s in shards.values()}
    if len(kinds) > 1:
        raise _Refuse(f"{p.target}: operands merged with the sequence differently")
    pre, post = kinds.pop()
    full = pre * ctx.S * post
    if p.target in _VIEWS:
        return _view_piece(ctx, p, vals, place)
    if p.target is aten.index.Tensor:
        return _index_piece(ctx, p, vals, place, shards)
    if p.target in _LAYOUT_OPS:
        _check_layout_op(ctx, p, shards)
    arg_specs = fx.node.map_arg((p.args, p.kwargs), lambda a: ArgSpec(
        _shape(a), a.meta["val"].dtype, place[a].dim if isinstance(place.get(a), Shard) else None))
    prop = propagate(p.target, arg_specs[0], arg_specs[1], ctx.P, ctx.group_name)
    filled = iter(tensor_args_in_order(p))
    wanted = iter(prop.inputs)

    def fill(v):
        if v is TENSOR:
            a = next(filled)
            want = next(wanted)
            return _operand(ctx, a, want, vals, place, olds, pre, post, full, p)
        if isinstance(v, (list, tuple)):
            return type(v)(fill(x) for x in v)
        return v
    args = tuple(fill(v) for v in prop.args)
    kwargs = {k: fill(v) for k, v in prop.kwargs.items()}
    outs = _output_placements(ctx, p, prop.outputs, pre, post, full)
    single = not isinstance(p.meta["val"], (list, tuple))
    new = ctx.emit(p.target, args, kwargs, outs[0] if single else outs)
    if single and isinstance(prop.outputs[0], tuple) and prop.outputs[0][0] == "partial":
        return _reduce_partial(ctx, new, prop.outputs[0][1], p), Replicate()
    return new, (outs[0] if single else outs)


def tensor_args_in_order(p: fx.Node) -> list[fx.Node]:
    found = []
    fx.node.map_arg((p.args, p.kwargs), found.append)
    return found


def _operand(ctx, a, want, vals, place, olds, pre, post, full, p):
    pl = place.get(a)
    if isinstance(pl, Shard):
        if want != ("shard", pl.dim):
            raise _Refuse(f"DTensor's rule for {p.target} needs the sequence gathered")
        return vals[a]
    if want[0] == "replicate":
        if a not in olds or ctx.grad_reduce == "none":
            return vals[a]
        if olds[a] is not None:
            return ctx.weight(olds[a])
        key = ("grad-summed", a)
        if key not in vals:
            vals[key] = ctx.emit(sum_grad_over_group, (vals[a], ctx.group_name), placement=Replicate())
            ctx.collectives.append(f"grad all-reduce {a.name}")
        return vals[key]
    if want[0] == "shard" and _shape(a)[want[1]] == full:
        return _slice(ctx, vals[a], _shape(a), want[1], pre, post)
    raise _Refuse(f"{p.target}: a replicated operand would have to be sharded as {want}")


def _slice(ctx, new, shape, d, pre, post):
    """A replicated value's part in the layout along dim ``d`` (its gradient is gathered)."""
    if pre == 1 and post == 1:
        return ctx.emit(shard_sequence_op, (new, d, ctx.schedule, ctx.group_name), placement=Shard(d))
    shape = list(shape)
    split = shape[:d] + [pre, ctx.S, post] + shape[d + 1:]
    local = shape[:d] + [pre * (ctx.S // ctx.P) * post] + shape[d + 1:]
    unmerged = ctx.emit(aten.reshape.default, (new, split))
    sliced = ctx.emit(shard_sequence_op, (unmerged, d + 1, ctx.schedule, ctx.group_name))
    return ctx.emit(aten.reshape.default, (sliced, local), placement=Shard(d, pre, post))


def _output_placements(ctx, p, outputs, pre, post, full):
    vals = p.meta["val"] if isinstance(p.meta["val"], (list, tuple)) else [p.meta["val"]]
    pls = []
    for o, v in zip(outputs, vals):
        if o is None or o[0] == "replicate":
            pls.append(Replicate())
        elif o[0] == "shard" and v.shape[o[1]] == full:
            pls.append(Shard(o[1], pre, post))
        elif o[0] == "partial" and o[1] in ("sum", "avg", "max", "min") and len(vals) == 1:
            pls.append(Replicate())
        else:
            raise _Refuse(f"{p.target}: DTensor places its result as {o}, which the layout cannot carry")
    return tuple(pls)


def _check_layout_op(ctx, p, shards):
    """A position-aware op is kept only when it acts on a dim that is not the sequence of the
    tensor it acts on (its index arguments may be sharded: they carry global positions)."""
    src = p.args[0]
    if p.target is aten.constant_pad_nd.default:
        pad, nd = list(p.args[1]), len(_shape(src))
        touched = [nd - 1 - i // 2 for i, w in enumerate(pad) if w]
        if src in shards and shards[src].dim in touched:
            raise _Refuse("padding along the sequence dim")
        return
    if p.target is aten.slice.Tensor and src in shards:
        dim = p.args[1] if len(p.args) > 1 else 0
        start, end = (p.args[2] if len(p.args) > 2 else None), (p.args[3] if len(p.args) > 3 else None)
        step = p.args[4] if len(p.args) > 4 else 1
        size = _shape(src)[dim]
        if dim % len(_shape(src)) == shards[src].dim and not (
                (start or 0) == 0 and (end is None or end >= size) and step == 1):
            raise _Refuse("slicing along the sequence dim")
        return
    if p.target not in _DIM_ARG:
        raise _Refuse(f"{p.target} depends on where a position sits in the layout")
    if src not in shards:
        return                       # a replicated table indexed by sharded positions
    i = _DIM_ARG[p.target]
    dim = p.args[i] if len(p.args) > i else p.kwargs.get("dim", _DIM_DEFAULT.get(p.target))
    if dim is None:
        raise _Refuse(f"{p.target} over every dim, the sequence included")
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    nd = len(_shape(src))
    if shards[src].dim in [d % nd for d in dims]:
        raise _Refuse(f"{p.target} along the sequence dim")


def _index_piece(ctx, p, vals, place, shards):
    """``x[..., idx, :]`` (advanced indexing, ``aten.index.Tensor``) of a sharded ``x`` by
    replicated indices on dims other than the sequence: every sequence position is indexed alike,
    so the local shard is indexed as it is (Falcon's fused MQA: ``qkv[..., [-2], :]``). DTensor
    has no usable strategy for it (its index rule rejects the ``None`` slots). Where the sequence
    lands follows advanced indexing's rule: the broadcast index dims replace the indexed dims in
    place when those are adjacent, else they come first."""
    src, indices = p.args[0], list(p.args[1])
    if src not in shards or any(isinstance(i, fx.Node) and i in shards for i in indices):
        raise _Refuse("advanced indexing by sharded indices")
    pl, nd = shards[src], len(_shape(src))
    indexed = [d for d, i in enumerate(indices) if i is not None]
    if pl.dim in indexed:
        raise _Refuse("advanced indexing along the sequence dim")
    index_nd = len(_shape(p)) - (nd - len(indexed))
    adjacent = indexed == list(range(indexed[0], indexed[-1] + 1))
    if adjacent:
        out = pl.dim if pl.dim < indexed[0] else pl.dim - len(indexed) + index_nd
    else:
        out = index_nd + sum(1 for d in range(pl.dim) if d not in indexed)
    new_indices = [None if i is None else vals[i] for i in indices]
    result = Shard(out, pl.pre, pl.post)
    if _shape(p)[out] != pl.pre * ctx.S * pl.post:
        raise _Refuse("advanced indexing that moves the sequence off its dim")
    return ctx.emit(p.target, (vals[src], new_indices), placement=result), result


def _view_piece(ctx, p, vals, place):
    src = p.args[0]
    pl = view_placement(_shape(src), _shape(p), place[src], ctx.S)
    if pl is None:
        raise _Refuse(f"view {_shape(src)} -> {_shape(p)} splits the sequence")
    return ctx.emit(p.target, (vals[src], local_view_shape(_shape(p), pl, ctx.P)), placement=pl), pl


def _reduce_partial(ctx, new, op: str, p):
    ctx.collectives.append(f"all-reduce {p.name}")
    if op in ("sum", "avg"):
        total = ctx.emit(all_reduce_to_replicated, (new, ctx.group_name), placement=Replicate())
        return total if op == "sum" else ctx.emit(operator.truediv, (total, ctx.P), placement=Replicate())
    raise _Refuse(f"{p.target}: a {op} across ranks has no differentiable all-reduce here")
