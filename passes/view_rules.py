"""Sharding rules of views, indexing, splits and concatenation: where the sequence dim goes when
a value is viewed, transposed, indexed, split or concatenated (``sharding_rules.py`` registers
them). Along the sequence itself: a view that splits it into rows of a token grid keeps a
contiguous layout's band of rows sharded (the sharding core's view rule), else is refused; a split / slice / narrow of it makes parts of the sequence
(``range_rules.py``), concatenation along it is refused.

Rules follow ``sharding_rules``' contract: ``(new node, placement)`` or a string saying why not.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .aten_rules import decomposed_rule
from seqpar_compiler.runtime.sharding.ops import split_refusal

from seqpar_compiler.runtime.grad_collectives import all_reduce_to_replicated

from .placement import Replicate, SeqRange, Shard, local_view_shape, view_placement
from .range_rules import getitem_part, slice_part, split_into_parts
from .rewrite import call_arguments

__all__ = ["VIEW_RULES", "norm_dim"]

# -- views ---------------------------------------------------------------------------------------
def _view(ctx, node):
    x = ctx.shard_of(node.args[0])
    src = tuple(ctx.example(node.args[0]).shape)
    dst = tuple(ctx.example(node).shape)
    layout = ctx.layout
    pl = view_placement(src, dst, x, ctx.S, rows_allowed=lambda post: layout.keeps_band(ctx.S, ctx.P, post))
    if pl is None:
        return split_refusal(src, dst, layout, ctx.S, ctx.P)
    shape = local_view_shape(dst, pl, ctx.P)
    if node.op == "call_method":
        new = ctx.emit(node.target, (ctx.env[node.args[0]], shape), op="call_method", placement=pl)
    else:
        new = ctx.emit(node.target, (ctx.env[node.args[0]], shape), placement=pl)
    return new, pl


def _norm_dim(d: int, nd: int) -> int:
    return d % nd if nd else 0


def _transpose(ctx, node):
    x = ctx.shard_of(node.args[0])
    nd = ctx.example(node.args[0]).dim()
    a = call_arguments(node, ["input", "dim0", "dim1"], {})
    d0, d1 = _norm_dim(a["dim0"], nd), _norm_dim(a["dim1"], nd)
    d = {d0: d1, d1: d0}.get(x.dim, x.dim)
    pl = Shard(d, x.pre, x.post)
    return ctx.emit(node.target, (ctx.env[node.args[0]], d0, d1), op=node.op, placement=pl), pl


def _permute(ctx, node):
    x = ctx.shard_of(node.args[0])
    nd = ctx.example(node.args[0]).dim()
    dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    dims = [_norm_dim(d, nd) for d in dims]
    pl = Shard(dims.index(x.dim), x.pre, x.post)
    return ctx.emit(node.target, (ctx.env[node.args[0]], dims), op=node.op, placement=pl), pl


def _unsqueeze(ctx, node):
    x = ctx.shard_of(node.args[0])
    nd = ctx.example(node).dim()
    d = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs["dim"], nd)
    pl = Shard(x.dim + (1 if d <= x.dim else 0), x.pre, x.post)
    return ctx.emit(node.target, (ctx.env[node.args[0]], d), op=node.op, placement=pl), pl


def _expand(ctx, node):
    x = ctx.shard_of(node.args[0])
    out = ctx.example(node)
    d = x.dim + out.dim() - ctx.example(node.args[0]).dim()
    pl = Shard(d, x.pre, x.post)
    sizes = list(out.shape)
    sizes[d] //= ctx.P
    return ctx.emit(node.target, (ctx.env[node.args[0]], sizes), op=node.op, placement=pl), pl


def _repeat(ctx, node):
    """``x.repeat(*sizes)``: tiling the sequence dim r times makes it the merged (r·pre, S, post),
    and the local tile is this rank's rows of every copy in that order (Llama 4's MoE repeats the
    token batch once per expert); the multipliers do not depend on the length."""
    x = ctx.shard_of(node.args[0])
    sizes = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
    if not sizes or not all(isinstance(r, int) for r in sizes):
        return "repeat with sizes that are not constants"
    d = x.dim + len(sizes) - ctx.example(node.args[0]).dim()
    pl = Shard(d, sizes[d] * x.pre, x.post)
    return ctx.emit(node.target, (ctx.env[node.args[0]], *sizes), op=node.op, placement=pl), pl


def _split(ctx, node):
    """chunk / split / tensor_split: along a dim other than the sequence every piece keeps the
    shard; along the sequence every piece is a part of it (``range_rules``)."""
    x = ctx.shard_of(node.args[0])
    nd = ctx.example(node.args[0]).dim()
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    if _norm_dim(dim, nd) == x.dim:
        return split_into_parts(ctx, node, node.args[0], x.dim)
    new = ctx.emit(node.target, tuple(ctx.env[a] if isinstance(a, fx.Node) else a for a in node.args),
                   node.kwargs, x, op=node.op)
    return new, tuple(x for _ in ctx.example(node))


def _getitem(ctx, node):
    container, index = node.args
    pl = ctx.placement_of(container)
    if isinstance(pl, tuple) and isinstance(index, int):
        return ctx.emit(operator.getitem, (ctx.env[container], index), placement=pl[index]), pl[index]
    if not isinstance(pl, Shard):
        return _lookup_at_sharded_index(ctx, node, container, index)
    out = _index_placement(ctx, ctx.example(container), index, pl)
    if out == "indexing along the sequence dim":
        picked = _select_position(ctx, container, index, pl)
        return picked if picked is not None else getitem_part(ctx, node, _index_placement)
    if out == "advanced indexing of a sharded tensor":
        picked = _pick_at_positions(ctx, container, index, pl)
        if picked is not None:
            return picked
    if isinstance(out, str):
        return out
    new_index = fx.node.map_arg(index, lambda a: ctx.env[a])
    return ctx.emit(operator.getitem, (ctx.env[container], new_index), placement=out), out


def _lookup_at_sharded_index(ctx, node, container, index):
    """``table[idx]``: a whole (replicated) table read at per-token integer indices, e.g. a
    sinusoid table at ``position_ids`` (CodeGen, GPT-J). The result has the index's dims first,
    so its rows are the index's rows: each rank looks up its own tokens, with no communication.
    A table that needs a gradient gets it by the scatter-add of its local rows, summed over the
    group like any replicated weight's. Masks (bool indices) and several index tensors are not
    lookups: refused, so the caller gathers."""
    items = index if isinstance(index, tuple) else (index,)
    idx = items[0] if len(items) == 1 else None
    if not isinstance(idx, fx.Node):
        return "indexing a replicated tensor with more than one index, or not at a tensor of indices"
    at = ctx.placement_of(idx)
    ex = ctx.example(idx)
    if (not isinstance(at, Shard) or isinstance(at, SeqRange) or not isinstance(ex, torch.Tensor)
            or ex.dtype == torch.bool or ex.is_floating_point() or ex.is_complex()):
        return "indexing a replicated tensor by a sharded mask or non-integer index"
    new = ctx.emit(operator.getitem, (ctx.env[container], ctx.env[idx]), placement=at)
    return new, at


def _select_position(ctx, container, index, pl: Shard):
    """``x[:, 0]``: one fixed position of the sequence (BERT's pooler reads the [CLS] token,
    ``hidden[:, 0]``). The rank that holds it selects its slot, the others a zero of the same
    shape, and one all-reduce makes it every rank's: exact, its gradient reaching that rank only.
    Only plain indexing (ints and slices, the int at the sequence dim); else None."""
    items = list(index) if isinstance(index, tuple) else [index]
    if (ctx.example(container).shape[pl.dim] != ctx.S or not pl.plain or len(items) <= pl.dim
            or not isinstance(items[pl.dim], int) or any(not isinstance(i, (int, slice)) for i in items)):
        return None
    if not -ctx.S <= items[pl.dim] < ctx.S:
        return None                                 # out of range: the gathered path raises as eager does
    position = items[pl.dim] % ctx.S
    slots = (ctx.positions(torch.device("cpu"), torch.long) == position).nonzero().flatten().tolist()
    local = list(items)
    local[pl.dim] = slots[0] if slots else 0
    value = ctx.emit(operator.getitem, (ctx.env[container], tuple(local)))
    if not slots:
        # held by another rank: this rank adds zero, still through its own rows, so its backward
        # reaches everything before (the ring's backward needs every rank); where, not a product,
        # so an inf in the row it reads adds no NaN; zeros of its dtype, so an integer pick stays one
        value = ctx.emit(torch.where, (ctx.emit(torch.zeros_like, (value,), {"dtype": torch.bool}), value,
                                       ctx.emit(torch.zeros_like, (value,))))
    return _summed_over_group(ctx, value)


def _summed_over_group(ctx, picked):
    """The ranks' picks (each rank's own rows, zeros elsewhere) summed: every rank's value; the
    backward is the identity, so each row's gradient stays on the rank that holds it."""
    out = ctx.emit(all_reduce_to_replicated, (picked, ctx.group_name), placement=Replicate())
    ctx.collectives.append(f"all-reduce sum {out.name}")
    return out, Replicate()


def _pick_at_positions(ctx, container, index, pl: Shard):
    """``x[rows, positions]``: one row of the sequence per pick, at global positions held in a
    replicated integer tensor (HF's sequence classifiers pool ``logits[arange(B), last_token]``).
    Each rank picks the rows it holds (a position's slot on this rank, from the layout), zeros
    the others, and one all-reduce sums the picks: exact, the gradient reaching the rank that
    holds each row. Only the paired form: every index before the sequence dim a replicated
    integer tensor, the sequence dim's one too, nothing after it; else None (the caller gathers)."""
    items = list(index) if isinstance(index, tuple) else [index]
    ex = ctx.example(container)
    if not pl.plain or len(items) != pl.dim + 1:
        return None
    for item in items:
        iex = ctx.example(item) if isinstance(item, fx.Node) else None
        if (not isinstance(iex, torch.Tensor) or iex.dtype in (torch.bool, torch.uint8) or iex.is_floating_point()
                or ctx.shard_of(item) is not None):
            return None
    slots = torch.full((ctx.S,), -1, dtype=torch.long, device=ex.device)
    positions = ctx.positions(ex.device, torch.long)
    slots[positions] = torch.arange(positions.numel(), device=ex.device)
    name = f"_seqpar_position_slots_{len(ctx.constants)}"
    ctx.constants[name] = slots
    slot_of = ctx.emit(name, (), op="get_attr", placement=Replicate())
    slot = ctx.emit(operator.getitem, (slot_of, ctx.env[items[-1]]))            # -1: not on this rank
    mine = ctx.emit(torch.ge, (slot, 0))
    local_index = tuple(ctx.env[i] for i in items[:-1]) + (ctx.emit(torch.clamp, (slot,), {"min": 0}),)
    picked = ctx.emit(operator.getitem, (ctx.env[container], local_index))    # [picks..., rest of x]
    rest = ex.dim() - len(items)
    keep = ctx.emit("view", (mine, [*ctx.example(items[-1]).shape] + [1] * rest), op="call_method") if rest else mine
    return _summed_over_group(ctx, ctx.emit(torch.where, (keep, picked, ctx.emit(torch.zeros_like, (picked,)))))


def _index_placement(ctx, ex, index, pl: Shard):
    """Where the sequence dim lands after basic indexing (ints, slices, None, ...) that takes
    all of it; a string when the index touches the sequence or is advanced indexing."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in items):
        return "advanced indexing of a sharded tensor"
    if items.count(Ellipsis) > 1:
        return "indexing with two ellipses"
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (ex.dim() - n_real)
    items += [slice(None)] * (ex.dim() - sum(1 for i in items if i is not None))
    in_dim, out_dim = 0, 0
    for item in items:
        if item is None:
            out_dim += 1
            continue
        if in_dim == pl.dim:
            full = ex.shape[in_dim]
            if not (isinstance(item, slice) and item.step in (None, 1) and (item.start or 0) in (0, -0)
                    and (item.stop is None or item.stop >= full)):
                return "indexing along the sequence dim"
            return Shard(out_dim, pl.pre, pl.post)
        if isinstance(item, slice):
            out_dim += 1
        in_dim += 1
    return "index does not reach the sequence dim"


def _cat(ctx, node):
    tensors = node.args[0]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    nd = ctx.example(node).dim()
    target = next(ctx.shard_of(t) for t in tensors if ctx.shard_of(t))
    if _norm_dim(dim, nd) == target.dim:
        # an empty operand (a KV cache before its first update) adds nothing
        rest = [t for t in tensors if ctx.example(t).numel() != 0]
        if len(rest) == 1 and ctx.shard_of(rest[0]):
            return ctx.env[rest[0]], target
        return "concatenation along the sequence dim"
    if not target.plain:
        return "concatenation of merged sequence dims"
    parts = []
    for t in tensors:
        pl = ctx.shard_of(t)
        if pl is not None and pl != target:
            return "operands sharded differently"
        parts.append(ctx.env[t] if pl else ctx.local(t, target.dim))
    return ctx.emit(node.target, (parts,), {"dim": dim}, target), target


def _narrow(ctx, node):
    """narrow along the sequence dim: a part of it; along another dim, DTensor's rule."""
    a = call_arguments(node, ["input", "dim", "start", "length"], {})
    x = ctx.shard_of(a["input"])
    ex = ctx.example(a["input"])
    if x is None or _norm_dim(a["dim"], ex.dim()) != x.dim or not all(isinstance(a[k], int) for k in ("start", "length")):
        return _generic_unless_part(ctx, node, x)
    if not x.plain:
        return "narrow along a sequence dim merged with another dim"
    start = a["start"] % ex.shape[x.dim] if a["start"] < 0 else a["start"]
    new, part = _slice_part(ctx, a["input"], x.dim, start, start + a["length"])
    return new, part


def _slice_part(ctx, x, dim, a, b):
    new, part = slice_part(ctx, x, dim, a, b)
    new.meta["seqpar_placement"] = part
    return new, part


def _tensor_split(ctx, node):
    x = ctx.shard_of(node.args[0])
    ex = ctx.example(node.args[0])
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    if x is None or _norm_dim(dim, ex.dim()) != x.dim:
        return _generic_unless_part(ctx, node, x)
    return split_into_parts(ctx, node, node.args[0], x.dim)


def _generic_unless_part(ctx, node, x):
    """DTensor's rule, which knows whole shards only: a part (``SeqRange``) falls back."""
    if isinstance(x, SeqRange):
        return "an op across a part of the sequence without a part rule"
    return decomposed_rule(ctx, node)



norm_dim = _norm_dim

VIEW_RULES = {
    ("method", "view"): _view, ("method", "reshape"): _view, torch.reshape: _view,
    ("method", "transpose"): _transpose, torch.transpose: _transpose,
    ("method", "permute"): _permute, torch.permute: _permute,
    ("method", "unsqueeze"): _unsqueeze, torch.unsqueeze: _unsqueeze,
    ("method", "expand"): _expand, ("method", "repeat"): _repeat,
    ("method", "chunk"): _split, torch.chunk: _split, ("method", "split"): _split, torch.split: _split,
    ("method", "tensor_split"): _tensor_split, torch.tensor_split: _tensor_split,
    ("method", "narrow"): _narrow, torch.narrow: _narrow,
    operator.getitem: _getitem,
    torch.cat: _cat,
}
# kinds for range_rules.dispatch
GETITEM_RULE, SPLIT_RULES, FINAL_VIEW_RULES = _getitem, (_split, _tensor_split, _narrow), {_cat, _split, _tensor_split, _narrow}
REUSABLE_VIEW_RULES = {_transpose, _permute, _unsqueeze}
