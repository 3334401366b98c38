"""The sharding core: how one ATen op runs when its tensor arguments are sharded over the
sequence, decided once for the compiled rewrite and for ``SequenceShard``'s eager dispatch.

No FX and no Dynamo here: an op is an ATen ``OpOverload`` and its arguments, with each tensor
argument described by ``TensorArg`` (global shape, dtype, placement). ``plan_op`` answers with an
``OpPlan``: what each tensor argument must be locally (this rank's shard as it is, a replicated
value sliced in the layout, or a replicated value whole), the arguments with shape arguments
made local, where each result is sharded, and whether the result is a partial sum to reduce
over the group. The compiled path emits that plan as graph nodes (``passes/aten_rules.py``);
the eager path runs it on local tensors (``runtime/sequence_shard_rules.py``). One registry, so
an op shards the same inside a frame and between frames (``tests/dist/test_sharding_core.py``).

Where a plan comes from:
  * seqpar's own rules (``RULES``, keyed by ATen op) for what depends on the layout: views that
    merge or split the sequence dim (``placements.view_placement``; a token grid's rows stay
    sharded under a contiguous layout), advanced indexing;
  * ops that mix the sequence — convolutions over time, rolls, flips, scans — through an op that
    knows the group (a halo exchange, a carry across ranks: ``mixing_rules.py``, ``OpPlan.call``);
  * other ops whose result depends on where a position sits (sorts, slices, gathers, padding:
    ``LAYOUT_OPS``) only along another dim than the sequence — refused along it;
  * everything else: DTensor's strategy (``dtensor_bridge.propagate``), whose ``Shard`` means
    contiguous chunks; taken only where the answer keeps the sequence on a dim of the same size
    (equivariant under any permutation of positions, so every layout is the same to it).
A refusal (``Refusal``) says why, and the caller gathers (warned) — never a guess.

Shape legend: S the global sequence length, P the group size; a sharded dim has global size
pre·S·post and local size pre·(S/P)·post.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .dtensor_bridge import TENSOR, ArgSpec, NoStrategy, is_symbolic, propagate
from .layout import Layout, layout_of
from .placements import Partial, Replicate, Shard, local_view_shape, view_placement

__all__ = ["TensorArg", "OpPlan", "Refusal", "plan_op", "split_refusal", "RULES", "LAYOUT_OPS", "VIEW_OPS"]

aten = torch.ops.aten


class Refusal(Exception):
    """The op cannot run on shards as placed; the message says why."""


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument as the core sees it: global ``shape``, ``dtype``, ``placement``."""

    shape: tuple
    dtype: torch.dtype
    placement: Any


@dataclass(frozen=True)
class OpPlan:
    """How to run one op on this rank.

    Attributes:
        operands: per tensor argument (flattened, in argument order): ``"local"`` (a shard as it
            is), ``("slice", dim)`` (a replicated value's part in the layout along ``dim``, merged
            like the op's shards) or ``"whole"`` (a replicated value as it is).
        args / kwargs: the arguments with shape arguments made local, ``TENSOR`` where a tensor goes.
        outputs: per output, its placement (``None`` for a non-tensor output; ``Partial`` for a
            result to sum or average over the group).
        merged: the (pre, post) factors of the op's shards.
        call: what runs instead of the op, when a rule needs the group (a scan's carry across
            ranks, a convolution's halo): a traceable op (``torch.ops.seqpar.*``) called with the
            filled arguments; None runs the op itself on the local tensors.
    """

    operands: tuple
    args: tuple
    kwargs: dict
    outputs: tuple
    merged: tuple = (1, 1)
    call: Any = None


VIEW_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
# position-aware ATen ops: their result depends on where a position sits in the dim
LAYOUT_OPS = {aten.roll.default, aten.flip.default, aten.cumsum.default, aten.cumprod.default,
              aten.logcumsumexp.default, aten.cummax.default, aten.cummin.default, aten.sort.default,
              aten.sort.stable, aten.topk.default, aten.tril.default, aten.triu.default, aten.diff.default,
              aten.slice.Tensor, aten.narrow.default, aten.unfold.default, aten.constant_pad_nd.default,
              aten.nll_loss_forward.default, aten.nll_loss2d_forward.default, aten.index_select.default,
              aten.gather.default, aten.scatter.src, aten.scatter_add.default, aten.index.Tensor,
              aten.select.int, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int,
              aten.as_strided.default, aten.diagonal.default}
# of those, the ones that do not depend on positions when the dim they act on is not the sequence
_DIM_ARG = {aten.roll.default: 2, aten.flip.default: 1, aten.cumsum.default: 1, aten.cumprod.default: 1,
            aten.logcumsumexp.default: 1, aten.cummax.default: 1, aten.cummin.default: 1, aten.sort.default: 1,
            aten.topk.default: 3, aten.diff.default: 2, aten.slice.Tensor: 1, aten.narrow.default: 1,
            aten.unfold.default: 1, aten.index_select.default: 1, aten.gather.default: 1, aten.select.int: 1,
            aten.split.Tensor: 2, aten.split_with_sizes.default: 2, aten.unbind.int: 1,
            aten.scatter.src: 1, aten.scatter_add.default: 1}
_DIM_DEFAULT = {aten.sort.default: -1, aten.topk.default: -1, aten.diff.default: -1, aten.slice.Tensor: 0,
                aten.split.Tensor: 0, aten.split_with_sizes.default: 0, aten.unbind.int: 0}

# seqpar's own rules: (op, args, kwargs, context) -> OpPlan
RULES: dict[Any, Callable] = {}


def op_registrar(table: dict) -> Callable:
    """A decorator factory: ``@rule(op, ...)`` files the function under each ATen op in ``table``
    (the core's RULES here; the eager shard and token-row dispatchers keep their own tables)."""
    def rule(*ops):
        def register(fn):
            for op in ops:
                table[op] = fn
            return fn
        return register
    return rule


_rule = op_registrar(RULES)


@dataclass(frozen=True)
class _Context:
    S: int
    P: int
    group_name: str | None
    pre: int
    post: int
    out_shapes: tuple             # global shapes of the outputs (None for a non-tensor output)
    layout: Layout = layout_of("zigzag")
    # a part of the sequence (a chunk): S is the part's length and this rank holds ``local_len``
    # of its positions (not S/P); None for the whole sequence
    local_len: int | None = None

    @property
    def part(self) -> bool:
        return self.local_len is not None

    def local_shape(self, dst: tuple, pl: Shard) -> list:
        """This rank's shape of a ``dst``-shaped value placed ``pl``."""
        if self.local_len is None:
            return local_view_shape(dst, pl, self.P)
        shape = list(dst)
        shape[pl.dim] = shape[pl.dim] // self.S * self.local_len
        return shape

    @property
    def full(self) -> int:
        return self.pre * self.S * self.post

    @property
    def schedule(self) -> str:
        """The layout's name, as the custom ops that take it carry it."""
        return self.layout.name

    def rows_allowed(self, per_position) -> bool:
        """May a dim of S·per_position elements in position order stay a band of rows? (Never
        a part's: its rows are no band of the layout.)"""
        return not self.part and self.layout.keeps_band(self.S, self.P, per_position)


def _flat_tensors(args, kwargs) -> list:
    found = []

    def visit(v):
        if isinstance(v, TensorArg):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
    for v in list(args) + list(kwargs.values()):
        visit(v)
    return found


def _slots(value):
    """``value`` with every TensorArg replaced by ``TENSOR``."""
    if isinstance(value, TensorArg):
        return TENSOR
    if isinstance(value, (list, tuple)):
        return type(value)(_slots(v) for v in value)
    return value


def _written_names(op) -> set:
    """The names of the arguments ``op`` writes (``Tensor(a!)`` in its schema)."""
    return {a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write}


def plan_op(op, args: tuple, kwargs: dict, *, S: int, P: int, group_name: str | None,
            out_shapes: tuple, schedule: str | Layout = "zigzag", local_len: int | None = None) -> OpPlan:
    """The plan of ``op`` with tensor arguments given as ``TensorArg`` (module docstring).

    ``out_shapes``: the global shape of each output (``None`` for a non-tensor), as tracing it on
    full-size examples gives; ``schedule``: the layout of the shards (a name or a ``Layout``).
    ``local_len``: the shards are a part of the sequence (a chunk) ``S`` positions long, of which
    this rank holds ``local_len``: an op that treats positions alike plans as for a whole shard,
    one that needs the layout's runs (a halo, a scan, a band of rows) is refused.
    Raises ``Refusal``."""
    tensors = _flat_tensors(args, kwargs)
    shards = [t for t in tensors if isinstance(t.placement, Shard)]
    if not shards:
        return OpPlan(tuple("whole" for _ in tensors), _slots(args), _slots(kwargs),
                      tuple(None if s is None else Replicate() for s in out_shapes))
    kinds = {(s.placement.pre, s.placement.post) for s in shards}
    if len(kinds) > 1:
        raise Refusal(f"{op}: operands merged with the sequence differently")
    pre, post = kinds.pop()
    ctx = _Context(S, P, group_name, pre, post, tuple(out_shapes), layout_of(schedule), local_len)
    rule = RULES.get(op)
    if rule is not None and ctx.part and op not in _PART_RULES:
        raise Refusal(f"{op} on a part of the sequence (its rule needs the layout's whole shards)")
    if rule is None and _draws_random(op):
        raise Refusal(f"{op} draws random numbers: run on shards, every rank would draw the same ones for its "
                      f"own tokens (computed whole, every rank draws the whole sequence's, as one device does)")
    if rule is not None:
        plan = rule(op, args, kwargs, ctx)
    else:
        if op in LAYOUT_OPS:
            _check_layout_op(op, args, kwargs)
        plan = _dtensor_plan(op, args, kwargs, ctx)
    if ctx.part and any(isinstance(o, Partial) and o.reduce != "sum" for o in plan.outputs):
        # ranks hold different counts of a part's rows: only a sum of their results is the whole
        raise Refusal(f"{op} on a part of the sequence reduces its rows by {plan.outputs} (unequal shares)")
    _check_writes(op, args, kwargs, plan)
    return plan


def _draws_random(op) -> bool:
    """A random ATen op (tagged ``nondeterministic_seeded``); dropout has its own rule."""
    return isinstance(op, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in op.tags


@_rule(aten.native_dropout.default)
def _native_dropout(op, args, kwargs, ctx: _Context) -> OpPlan:
    """Dropout of a shard (the fused kernel accelerators decompose ``F.dropout`` to): a mask
    drawn per rank (``runtime/rank_dropout.py``); the same op when off."""
    x, p, train = (list(args) + [None, None])[:3]
    if len(args) != 3 or kwargs or not isinstance(p, (int, float)) or not isinstance(train, bool):
        raise Refusal(f"{op} with arguments the per-rank dropout does not take")
    outputs = (x.placement, x.placement)
    if not train or p == 0:
        return OpPlan(("local",), (TENSOR, p, train), {}, outputs, (ctx.pre, ctx.post))
    return OpPlan(("local",), (TENSOR, float(p), ctx.group_name or ""), {}, outputs, (ctx.pre, ctx.post),
                  call=torch.ops.seqpar.rank_dropout.default)


def _check_writes(op, args, kwargs, plan: OpPlan) -> None:
    """A written argument must be written where it lives: never a slice made for the op."""
    names = _written_names(op)
    if not names:
        return
    schema_names = [a.name for a in op._schema.arguments]
    named = [(schema_names[i] if i < len(schema_names) else None, v) for i, v in enumerate(args)]
    named += list(kwargs.items())               # the order _flat_tensors counts them in
    k = 0
    for name, value in named:
        count = len(_flat_tensors((value,), {}))
        if name in names and any(isinstance(how, tuple) for how in plan.operands[k:k + count]):
            raise Refusal(f"{op} writes into a replicated value that would be sliced for it")
        k += count


def _dtensor_plan(op, args, kwargs, ctx: _Context) -> OpPlan:
    def spec(v):
        if isinstance(v, TensorArg):
            return ArgSpec(tuple(v.shape), v.dtype, v.placement.dim if isinstance(v.placement, Shard) else None)
        if isinstance(v, (list, tuple)):
            return type(v)(spec(x) for x in v)
        return v
    try:
        prop = propagate(op, tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()},
                         ctx.P, ctx.group_name)
    except NoStrategy as err:
        raise Refusal(f"DTensor has no usable strategy for {op} ({err})") from err
    tensors = _flat_tensors(args, kwargs)
    if len(prop.inputs) != len(tensors):
        raise Refusal(f"DTensor's answer for {op} does not place every tensor argument")
    operands = []
    for t, want in zip(tensors, prop.inputs):
        if isinstance(t.placement, Shard):
            if want != ("shard", t.placement.dim):
                raise Refusal(f"DTensor's rule for {op} needs the sequence gathered")
            operands.append("local")
        elif want[0] == "replicate":
            operands.append("whole")
        elif want[0] == "shard" and t.shape[want[1]] == ctx.full:
            operands.append(("slice", want[1]))
        else:
            raise Refusal(f"{op}: a replicated operand would have to be sharded as {want}")
    outputs = []
    for o, shape in zip(prop.outputs, ctx.out_shapes):
        if shape is None:
            outputs.append(None)
        elif o is None or o[0] == "replicate":
            outputs.append(Replicate())
        elif o[0] == "shard" and shape[o[1]] == ctx.full:
            outputs.append(Shard(o[1], ctx.pre, ctx.post))
        elif o[0] == "partial" and o[1] in ("sum", "avg"):
            outputs.append(Partial(o[1]))
        else:
            raise Refusal(f"{op}: DTensor places its result as {o}, which the layout cannot carry")
    return OpPlan(tuple(operands), _local_shape_args(op, prop, args, outputs, ctx), prop.kwargs, tuple(outputs),
                  (ctx.pre, ctx.post))


def _local_shape_args(op, prop, args, outputs, ctx: _Context) -> tuple:
    """DTensor's local arguments, with an output-shape argument (``expand``'s sizes) computed
    from the global output shape as ``local_view_shape`` does: the sharded dim divided by P.
    DTensor computes the same from example sizes, a number that would pin a symbolic length
    (HF's ``repeat_kv`` expands a shard between frames: one compile per length)."""
    if prop.shape_arg is None:
        return prop.args
    if prop.stride_arg is not None and is_symbolic(args[prop.shape_arg:prop.stride_arg + 1]):
        # the local stride follows from the local shape in DTensor's terms only: not rebuilt here
        raise Refusal(f"{op}: symbolic shape and stride arguments of a sharded result")
    shard = outputs[0]
    if not isinstance(shard, Shard) or ctx.out_shapes[0] is None:
        raise Refusal(f"{op}: DTensor made a shape argument local for a result the layout does not shard")
    local = list(prop.args)
    local[prop.shape_arg] = ctx.local_shape(tuple(ctx.out_shapes[0]), shard)
    return tuple(local)


def _check_layout_op(op, args, kwargs) -> None:
    """A position-aware op is kept only when it acts on a dim that is not the sequence of the
    tensor it acts on (its index arguments may be sharded: they carry global positions)."""
    src = args[0]
    sharded = isinstance(src, TensorArg) and isinstance(src.placement, Shard)
    if op is aten.constant_pad_nd.default:
        pad, nd = list(args[1]), len(src.shape)
        touched = [nd - 1 - i // 2 for i, w in enumerate(pad) if w]
        if sharded and src.placement.dim in touched:
            raise Refusal("padding along the sequence dim")
        return
    if op is aten.slice.Tensor and sharded:
        dim = args[1] if len(args) > 1 else 0
        start, end = (args[2] if len(args) > 2 else None), (args[3] if len(args) > 3 else None)
        step = args[4] if len(args) > 4 else 1
        size = src.shape[dim]
        if dim % len(src.shape) == src.placement.dim and not (
                (start or 0) == 0 and (end is None or end >= size) and step == 1):
            raise Refusal("slicing along the sequence dim")
        return
    if op not in _DIM_ARG:
        raise Refusal(f"{op} depends on where a position sits in the layout")
    if not sharded:
        return                       # a replicated table indexed by sharded positions
    i = _DIM_ARG[op]
    dim = args[i] if len(args) > i else kwargs.get("dim", _DIM_DEFAULT.get(op))
    if dim is None:
        raise Refusal(f"{op} over every dim, the sequence included")
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    if src.placement.dim in [d % len(src.shape) for d in dims]:
        raise Refusal(f"{op} along the sequence dim")


@_rule(*VIEW_OPS)
def _view(op, args, kwargs, ctx: _Context) -> OpPlan:
    """Views keep merged (batch × sequence) dims local. A view that splits the sequence into
    rows (a token grid) keeps a contiguous layout's band of rows sharded when every rank holds
    whole rows; otherwise (zigzag and striped shards are no band, or rows straddle ranks) it
    is refused, naming why."""
    src = args[0]
    if not isinstance(src, TensorArg) or not isinstance(src.placement, Shard):
        raise Refusal(f"{op} of a replicated value with a sharded size")
    dst = ctx.out_shapes[0]
    pl = view_placement(tuple(src.shape), tuple(dst), src.placement, ctx.S, rows_allowed=ctx.rows_allowed)
    if pl is None:
        raise Refusal(split_refusal(tuple(src.shape), tuple(dst), ctx.layout, ctx.S, ctx.P))
    return OpPlan(("local",), (TENSOR, ctx.local_shape(tuple(dst), pl)), {}, (pl,), (ctx.pre, ctx.post))


def split_refusal(src: tuple, dst: tuple, layout: Layout, S: int, P: int) -> str:
    """Why a view that splits the sequence cannot stay sharded: what to change to keep it."""
    if not layout.contiguous:
        why = (f"the {layout.name} layout's shards are no band of rows; a contiguous layout "
               f"(schedule ring, distflash or ulysses) keeps a token grid sharded")
    else:
        why = (f"each rank's {S // P} positions are no whole rows; with rows of W positions, P={P} must "
               f"divide the number of rows S/W")
    return f"view {src} -> {dst} splits the sequence ({why})"


@_rule(aten.index.Tensor)
def _index(op, args, kwargs, ctx: _Context) -> OpPlan:
    """``x[..., idx, :]`` of a sharded ``x`` by replicated indices on dims other than the
    sequence: every position is indexed alike, so the local shard is indexed as it is (Falcon's
    fused MQA: ``qkv[..., [-2], :]``). Where the sequence lands follows advanced indexing's
    rule: the broadcast index dims replace the indexed dims in place when those are adjacent,
    else they come first."""
    src, indices = args[0], list(args[1])
    if not (isinstance(src, TensorArg) and isinstance(src.placement, Shard)) or any(
            isinstance(i, TensorArg) and isinstance(i.placement, Shard) for i in indices):
        raise Refusal("advanced indexing by sharded indices")
    pl, nd = src.placement, len(src.shape)
    indexed = [d for d, i in enumerate(indices) if i is not None]
    if pl.dim in indexed:
        raise Refusal("advanced indexing along the sequence dim")
    out_shape = ctx.out_shapes[0]
    index_nd = len(out_shape) - (nd - len(indexed))
    adjacent = indexed == list(range(indexed[0], indexed[-1] + 1))
    if adjacent:
        out = pl.dim if pl.dim < indexed[0] else pl.dim - len(indexed) + index_nd
    else:
        out = index_nd + sum(1 for d in range(pl.dim) if d not in indexed)
    if out_shape[out] != ctx.full:
        raise Refusal("advanced indexing that moves the sequence off its dim")
    operands = ("local",) + tuple("whole" for i in indices if isinstance(i, TensorArg))
    slots = [None if i is None else TENSOR for i in indices]
    return OpPlan(operands, (TENSOR, slots), {}, (Shard(out, pl.pre, pl.post),), (ctx.pre, ctx.post))


_REDUCTIONS = {aten.sum.dim_IntList: "sum", aten.sum.default: "sum", aten.mean.dim: "avg", aten.mean.default: "avg"}


# a mean over a part of the sequence: this rank's sum over the global count (ranks hold different
# counts of a part's rows, so averaging the ranks' local means would weigh them wrongly).
# Composite: it decomposes into sum and div wherever it runs, eager or traced, with their autograd
_LIB = torch.library.Library("seqpar", "FRAGMENT")
_LIB.define("part_mean(Tensor x, int[] dims, bool keepdim, int count, *, ScalarType? dtype=None) -> Tensor")


def _part_mean(x, dims, keepdim, count, *, dtype=None):
    return torch.sum(x, dims, keepdim, dtype=dtype) / count


_LIB.impl("part_mean", _part_mean, "CompositeImplicitAutograd")


@_rule(*_REDUCTIONS)
def _reduction(op, args, kwargs, ctx: _Context) -> OpPlan:
    """sum / mean: over other dims the shard stays where it is (moved past the reduced dims);
    over the sequence the local result is this rank's part of the whole, summed over the group —
    a mean's local part averages equal shares, so the group averages them. On a part of the
    sequence the shares are not equal: each rank's sum over the global count, summed."""
    src = args[0]
    if not (isinstance(src, TensorArg) and isinstance(src.placement, Shard)):
        raise Refusal(f"{op} of a replicated value")
    nd = len(src.shape)
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    dims = list(range(nd)) if not dims else [d % nd for d in ([dims] if isinstance(dims, int) else dims)]
    pl = src.placement
    slots = (TENSOR, *args[1:])
    kw = {k: v for k, v in kwargs.items()}
    if pl.dim in dims and _REDUCTIONS[op] == "avg" and ctx.part:
        count = math.prod(src.shape[d] for d in dims)
        return OpPlan(("local",), (TENSOR, dims, bool(keepdim), int(count)), {"dtype": kwargs.get("dtype")},
                      (Partial("sum"),), (ctx.pre, ctx.post), call=torch.ops.seqpar.part_mean.default)
    if pl.dim in dims:
        return OpPlan(("local",), slots, kw, (Partial(_REDUCTIONS[op]),), (ctx.pre, ctx.post))
    dim = pl.dim if keepdim else pl.dim - sum(1 for d in dims if d < pl.dim)
    return OpPlan(("local",), slots, kw, (Shard(dim, pl.pre, pl.post),), (ctx.pre, ctx.post))


# binary elementwise ops DTensor registers no strategy for: planned as the multiplication they
# broadcast like (Llama 4's rotary table: ``torch.polar(ones, freqs)`` over positions)
_ELEMENTWISE_AS_MUL = {aten.complex.default, aten.polar.default}


@_rule(*_ELEMENTWISE_AS_MUL)
def _elementwise_as_mul(op, args, kwargs, ctx: _Context) -> OpPlan:
    """Elementwise in its two operands with broadcasting: every position is computed from the
    same position of its operands, so the layout does not matter; DTensor's answer for ``mul``."""
    return _dtensor_plan(aten.mul.Tensor, args, kwargs, ctx)


_NEW_BUFFERS = {aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default}


@_rule(*_NEW_BUFFERS)
def _new_buffer(op, args, kwargs, ctx: _Context) -> OpPlan:
    """``x.new_zeros(size)`` and friends shaped like the shard ``x`` (the sequence at full
    length): a fresh buffer of this rank's rows (a guess about how it is written; the compiled
    rewrite's alias check makes it whole where a write cannot stay on the shard); any other size
    is a replicated buffer."""
    src, size = args[0], list(args[1])
    pl = src.placement
    slots = (TENSOR, *args[1:])
    if isinstance(pl, Shard) and len(size) == len(src.shape) and size[pl.dim] == ctx.full:
        size = ctx.local_shape(tuple(size), pl)
        return OpPlan(("local",), (TENSOR, size, *args[2:]), dict(kwargs), (Shard(pl.dim, pl.pre, pl.post),),
                      (ctx.pre, ctx.post))
    return OpPlan(("local",), slots, dict(kwargs), (Replicate(),), (ctx.pre, ctx.post))


# the rules that hold on a part of the sequence as on a whole shard (they treat positions alike)
_PART_RULES = {*VIEW_OPS, aten.index.Tensor, *_REDUCTIONS, *_ELEMENTWISE_AS_MUL, *_NEW_BUFFERS,
               aten.native_dropout.default}

# the rules for ops that mix the sequence (they need the group: a halo, a carry) live beside
from . import mixing_rules  # noqa: E402,F401  (registers into RULES)
from .. import rank_dropout  # noqa: E402,F401  (seqpar::rank_dropout, the dropout rule's call)
