"""Sharding rules for parts of the sequence (``SeqRange``): a chunked loss shards exactly.

Chunked cross-entropy (Liger, torchtune) splits hidden states or logits along the sequence and
computes head + loss per chunk. A chunk [start, stop) of the global sequence is spread over the
ranks by the layout (zigzag: most chunks live on one rank, some on two), so a chunk is placed
``SeqRange``: each rank holds its rows of it, in layout order, possibly none. What makes a part:
``split`` / ``chunk`` / ``tensor_split`` / ``narrow`` / ``x[:, a:b]`` along the sequence dim of a
shard (or of a part). What computes on a part, locally: pointwise ops (replicated operands of the
part's length are sliced like it), views and flatten (merged batch × part dims), linears,
projections, norms, embeddings, transposes, indexing of other dims, sum / mean (local + one
all-reduce, divided by the global count), cross entropy (``none`` / ``sum`` / ``mean`` over the
valid targets of the part, all-reduced). Anything else gathers the part (``range_layout.
gather_part``) and runs replicated with the usual warning: exact, never a guess. An op with
no rule here takes the sharding core's plan with the part's local length first
(``aten_rules.decomposed_rule``). A part that leaves the frame leaves as a part (its frame
spec names the range: ``ShardSpec.part``), except a chunk of merged sequences or any part under
``SEQPAR_OUTPUT=local``, which is gathered the same way.

Reads the placements the rewrite has given a node's inputs; returns ``(new node, placement)``
like any rule (``sharding_rules.py``). Entry point: ``dispatch``, which every rule goes through.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from seqpar_compiler.runtime.grad_collectives import all_reduce_to_replicated

from .placement import Replicate, SeqRange, Shard
from .range_layout import (flat_source, gather_part, local_count, local_shape, normalize, part_positions,
                           slice_replicated, sub_range, take_rows)
from .rewrite import SeqparFallbackError, call_arguments

__all__ = ["dispatch", "split_into_parts", "slice_part", "getitem_part", "VIEW_KEYS", "REDUCTION_KEYS"]

VIEW_KEYS = {("method", "view"), ("method", "reshape"), ("method", "flatten"), ("method", "unflatten"),
             ("method", "view_as"), ("method", "reshape_as"), torch.reshape, torch.flatten, torch.unflatten}
REDUCTION_KEYS = {("method", "sum"), ("method", "mean"), torch.sum, torch.mean}
_CE = {F.cross_entropy}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_FULL_REDUCTIONS = {("method", "sum"), ("method", "mean"), torch.sum, torch.mean}


class Pieces(SeqRange):
    """The concatenation of several parts along ``dim``, each rank holding its rows of each in
    part order (litgpt's ``torch.cat(loss_chunks)`` of chunks merged with the batch): the order
    is no layout's, so only a reduction over every element may read it (``_cat`` makes one only
    when every user is one)."""


def _leaves_as_part(pl) -> bool:
    """Can a frame output placed ``pl`` leave as a part (``ShardSpec.part`` says it)? One part
    of one sequence; a container of parts is gathered."""
    return type(pl) is SeqRange and pl.outer == 1


def _key(node):
    return ("method", node.target) if node.op == "call_method" else node.target


def _has_part(pl) -> bool:
    if isinstance(pl, tuple):
        return any(_has_part(p) for p in pl)
    return isinstance(pl, SeqRange)


def _norm(d: int, nd: int) -> int:
    return d % nd if nd else 0


# -- making parts ------------------------------------------------------------------------------
def split_into_parts(ctx, node: fx.Node, x: fx.Node, dim: int):
    """``split`` / ``chunk`` / ``tensor_split`` of ``x`` along its sequence dim ``dim``: every
    piece a part; the piece sizes are read off the (global) example outputs, so each of torch's
    size conventions is handled alike."""
    pl = ctx.shard_of(x)
    if not pl.plain:
        if isinstance(pl, SeqRange) or pl.post != 1:
            return "split along a sequence dim merged with another dim"
        pl = flat_source(ctx, pl)      # [B·S, ...]: chunks of the flat dim of B merged sequences
    sizes = [e.shape[dim] for e in ctx.example(node)]
    size = ctx.example(x).shape[dim]
    new, pls, at = [], [], 0
    for s in sizes:
        part, rows = sub_range(ctx, pl, at, at + s)
        new.append(take_rows(ctx, ctx.env[x], dim, rows, local_count(ctx, pl), ctx.example(x).device))
        new[-1].meta["seqpar_placement"] = part
        pls.append(part)
        at += s
    if at != size:
        return f"pieces of {sizes} do not cover the sequence dim of size {size}"
    pls = tuple(pls)
    return ctx.emit(tuple, (new,), placement=pls), pls


def slice_part(ctx, x: fx.Node, dim: int, a: int, b: int) -> tuple[fx.Node, Shard]:
    """Positions [a, b) (relative to ``x``'s range) of ``x`` along its sequence dim ``dim``."""
    pl = ctx.shard_of(x)
    part, rows = sub_range(ctx, pl, a, b)
    new = take_rows(ctx, ctx.env[x], dim, rows, local_count(ctx, pl), ctx.example(x).device)
    return new, part


def getitem_part(ctx, node: fx.Node, index_placement):
    """``x[..., a:b, ...]`` with a step-1 slice along the sequence dim of a shard or part: this
    rank's rows of [a, b) first, then the rest of the index (which no longer touches the
    sequence); ``index_placement`` is the plain rule's placement of basic indexing."""
    x, index = node.args
    pl, ex = ctx.shard_of(x), ctx.example(x)
    items = list(index) if isinstance(index, tuple) else [index]
    if not pl.plain or items.count(Ellipsis) > 1:
        return "indexing a merged sequence dim, or with two ellipses"
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in items):
        return "advanced indexing of a sharded tensor"
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (ex.dim() - n_real)
    items += [slice(None)] * (ex.dim() - sum(1 for i in items if i is not None))
    real = [k for k, i in enumerate(items) if i is not None]
    at = real[pl.dim]
    item = items[at]
    if not isinstance(item, slice) or item.step not in (None, 1):
        return "indexing along the sequence dim other than by a step-1 slice"
    a, b, _ = item.indices(ex.shape[pl.dim])
    new_x, part = slice_part(ctx, x, pl.dim, a, max(a, b))
    items[at] = slice(None)
    moved = index_placement(ctx, ex, tuple(items), pl)
    if isinstance(moved, str):
        return moved
    part = part.moved(moved) if isinstance(part, SeqRange) else moved
    return ctx.emit(operator.getitem, (new_x, tuple(items)), placement=part), part


# -- computing on parts ------------------------------------------------------------------------
def _operand_part(ctx, node):
    """The one part all part-placed operands share (after broadcasting), or a string."""
    out = ctx.example(node)
    target = None
    for a in node.all_input_nodes:
        pl = ctx.placement_of(a)
        if isinstance(pl, tuple):
            return "a container of parts used as a whole"
        if not isinstance(pl, Shard):
            continue
        if not isinstance(pl, SeqRange):
            return "a part of the sequence meets the whole sequence"
        cand = pl.moved(Shard(pl.dim + out.dim() - ctx.example(a).dim(), pl.pre, pl.post))
        if target is not None and cand != target:
            return f"operands hold different parts ({target} vs {cand})"
        target = cand
    return target


def _pointwise(ctx, node):
    out = ctx.example(node)
    if not isinstance(out, torch.Tensor):
        return "non-tensor result"
    target = _operand_part(ctx, node)
    if isinstance(target, str):
        return target
    full = target.pre * target.length * target.post

    def operand(a):
        if isinstance(ctx.placement_of(a), SeqRange):
            return ctx.env[a]
        ex = ctx.example(a)
        if not isinstance(ex, torch.Tensor):
            return ctx.env[a]
        ad = target.dim - (out.dim() - ex.dim())
        if ad < 0 or ex.shape[ad] == 1:
            return ctx.weight(a)
        if ex.shape[ad] == full:
            return slice_replicated(ctx, a, ad, target)
        raise _NoRule(f"a replicated operand of size {ex.shape[ad]} meets a part of length {full}")
    try:
        args, kwargs = fx.node.map_arg(node.args, operand), fx.node.map_arg(node.kwargs, operand)
    except _NoRule as e:
        return str(e)
    return ctx.emit(node.target, args, kwargs, target, op=node.op), target


class _NoRule(Exception):
    pass


def _view(ctx, node):
    from .placement import view_placement
    x = node.args[0]
    pl = ctx.placement_of(x)
    if not isinstance(pl, SeqRange) or any(isinstance(ctx.placement_of(a), Shard) for a in node.all_input_nodes[1:]):
        return "a view of something other than one part"
    src, dst = tuple(ctx.example(x).shape), tuple(ctx.example(node).shape)
    moved = view_placement(src, dst, Shard(pl.dim, pl.pre, pl.post), pl.length)
    if moved is None:
        return f"view {src} -> {dst} splits the part of the sequence"
    part = pl.moved(moved)
    return ctx.emit("reshape", (ctx.env[x], local_shape(ctx, dst, part)), op="call_method", placement=part), part


def _reduction(ctx, node, base):
    x = node.args[0]
    pl = ctx.placement_of(x)
    ex = ctx.example(x)
    a = call_arguments(node, ["input", "dim", "keepdim"], {"dim": None, "keepdim": False})
    dims = a["dim"]
    dims = list(range(ex.dim())) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(_norm(d, ex.dim()) for d in dims)
    if pl.dim not in dims:
        return _reuse(ctx, node, base)
    if a.get("dtype") is not None or len(node.args) > 3:
        return "a reduction with a dtype argument"
    local = ctx.emit(torch.sum, (ctx.env[x],), {"dim": dims, "keepdim": a["keepdim"]})
    ctx.collectives.append(f"all-reduce {node.name}")
    total = ctx.emit(all_reduce_to_replicated, (local, ctx.group_name), placement=Replicate())
    kind = node.target if isinstance(node.target, str) else node.target.__name__
    if kind == "mean":
        count = 1
        for r in dims:
            count *= ex.shape[r]
        total = ctx.emit(operator.truediv, (total, count), placement=Replicate())
    return total, Replicate()


def _cross_entropy(ctx, node):
    """Cross entropy of a part of the logits (tokens along any dim but the class dim)."""
    a = call_arguments(node, ["input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction",
                              "label_smoothing"], {"weight": None, "ignore_index": -100, "reduction": "mean",
                                                   "label_smoothing": 0.0, "size_average": None, "reduce": None})
    x, t = ctx.placement_of(a["input"]), ctx.placement_of(a["target"])
    nd = ctx.example(a["input"]).dim()
    if not isinstance(x, SeqRange) or nd < 2 or x.dim == 1:
        return "cross entropy of a part sharded along its class dim"
    td = 0 if x.dim == 0 else x.dim - 1
    tpart = x.moved(Shard(td, x.pre, x.post))
    tgt_ex = ctx.example(a["target"])
    if (a["weight"] is not None or a["size_average"] is not None or a["reduce"] is not None
            or tgt_ex.is_floating_point() or tgt_ex.dim() != nd - 1):
        return "cross entropy in a form without a rule (class-index targets, no weight)"
    if isinstance(t, SeqRange):
        if t != tpart:
            return "cross entropy of logits and targets holding different parts"
        tgt = ctx.env[a["target"]]
    elif isinstance(t, Shard):
        return "cross entropy of a part of the logits and the whole sequence of targets"
    elif tgt_ex.shape[td] == tpart.pre * tpart.length * tpart.post:
        tgt = slice_replicated(ctx, a["target"], td, tpart)
    else:
        return "cross entropy targets that do not match the part of the logits"
    opts = {"ignore_index": a["ignore_index"], "label_smoothing": a["label_smoothing"]}
    inp = ctx.env[a["input"]]
    if a["reduction"] == "none":
        return ctx.emit(F.cross_entropy, (inp, tgt), {**opts, "reduction": "none"}, tpart), tpart
    local = ctx.emit(F.cross_entropy, (inp, tgt), {**opts, "reduction": "sum"})
    ctx.collectives.append(f"all-reduce {node.name}")
    if a["reduction"] == "sum":
        return ctx.emit(all_reduce_to_replicated, (local, ctx.group_name), placement=Replicate()), Replicate()
    valid = ctx.emit(operator.ne, (tgt, a["ignore_index"]))
    count = ctx.emit("sum", (valid,), op="call_method")
    count = ctx.emit("to", (count, ctx.example(node).dtype), op="call_method")
    both = ctx.emit(all_reduce_to_replicated, (ctx.emit(torch.stack, ([local, count],)), ctx.group_name))
    loss_sum, n = ctx.emit(operator.getitem, (both, 0)), ctx.emit(operator.getitem, (both, 1))
    return ctx.emit(operator.truediv, (loss_sum, n), placement=Replicate()), Replicate()


def _cat(ctx, node):
    """``torch.cat`` of parts along their dim: consecutive parts, in order, whose rows each rank
    holds in ascending order (every layout's local order) are one bigger part, locally their
    concatenation; any parts summed or averaged whole right after are ``Pieces``."""
    a = call_arguments(node, ["tensors", "dim"], {"dim": 0})
    items = list(a["tensors"]) if isinstance(a["tensors"], (list, tuple)) else None
    if not items or not all(isinstance(t, fx.Node) for t in items):
        return "a concatenation of something other than a list of parts"
    pls = [ctx.placement_of(t) for t in items]
    nd = ctx.example(node).dim()
    dim = _norm(a["dim"], nd)
    if not all(isinstance(p, SeqRange) and not isinstance(p, Pieces) and p.dim == dim for p in pls):
        return "a concatenation of parts and other values, or along another dim"
    local = ctx.emit(torch.cat, ([ctx.env[t] for t in items], dim))
    first, last = pls[0], pls[-1]
    joined = SeqRange(dim, first.pre, first.post, first.start, last.stop, outer=first.outer)
    consecutive = all((p.pre, p.post, p.outer) == (first.pre, first.post, first.outer) for p in pls) and all(
        p.stop == q.start for p, q in zip(pls, pls[1:]))
    if consecutive and first.pre == 1 and part_positions(ctx, joined) == tuple(
            f for p in pls for f in part_positions(ctx, p)):
        pl = normalize(ctx, joined)
        local.meta["seqpar_placement"] = pl
        return local, pl
    if all(_key(u) in _FULL_REDUCTIONS and len(u.args) == 1 and not u.kwargs for u in node.users):
        pl = Pieces(dim, 1, 1, 0, 0)
        local.meta["seqpar_placement"] = pl
        return local, pl
    return "a concatenation of parts in an order no layout has, read other than by a whole sum or mean"


def _reuse(ctx, node, rule):
    """A plain-shard rule whose emitted op does not depend on the local length (linears, norms,
    transposes, reductions over other dims): its answer, carried to the part."""
    target = _operand_part(ctx, node)
    if isinstance(target, str) or target is None:
        return target or "no part among the operands"
    result = rule(ctx, node)
    if isinstance(result, str) or result is None:
        return result
    new, pl = result

    def carry(p):
        if isinstance(p, tuple):
            return tuple(carry(q) for q in p)
        return target.moved(p) if isinstance(p, Shard) and not isinstance(p, SeqRange) else p
    return new, carry(pl)


# -- the entry point -------------------------------------------------------------------------
def dispatch(ctx, node: fx.Node, base, kind: str | None, hand=None):
    """Run ``node``'s rule. ``base`` is its plain-shard rule; ``kind`` says what its hand-written
    rule ``hand`` is (``"pointwise"``, ``"reuse"``: safe on parts, ``"getitem"``, ``"split"``, or
    None). Nodes with no part among their inputs go straight to ``base``; so does every plain
    graph. Parts only ever see ``hand`` (never the generic DTensor rule, which knows whole shards
    only: its shape arguments assume S/P rows)."""
    if not any(_has_part(ctx.placement_of(a)) for a in node.all_input_nodes):
        return _exit(ctx, node, base(ctx, node))
    try:
        result = _part_rule(ctx, node, hand, kind)
    except (ValueError, SeqparFallbackError):
        raise
    except Exception as err:  # noqa: BLE001 - a rule that cannot handle this use: the exact fallback
        result = f"its rule failed ({type(err).__name__}: {err})"
    if isinstance(result, str) or result is None:
        # no rule of its own for a part: the sharding core's plan with the part's local length
        # (log-softmax, an RMS norm, a cast ... on a chunk), as the eager path runs it between frames
        from .aten_rules import decomposed_rule
        core = decomposed_rule(ctx, node) if node.op in ("call_function", "call_method") else None
        if isinstance(core, tuple):
            return _exit(ctx, node, core)
        return _fallback(ctx, node, result or "no rule for a part of the sequence")
    return _exit(ctx, node, result)


def _part_rule(ctx, node, base, kind):
    key = _key(node)
    if kind == "getitem" or kind == "split":
        return _reuse_or_self(ctx, node, base)
    if kind == "pointwise":
        return _pointwise(ctx, node)
    if key in VIEW_KEYS:
        return _view(ctx, node)
    if key in REDUCTION_KEYS:
        return _reduction(ctx, node, base)
    if key in _CE:
        return _cross_entropy(ctx, node)
    if key in _CAT:
        return _cat(ctx, node)
    if kind == "reuse":
        return _reuse(ctx, node, base)
    return None


def _reuse_or_self(ctx, node, base):
    """getitem / split-like rules know parts themselves (a tuple's element, a slice of a part);
    only their non-sequence forms need carrying."""
    container = node.args[0]
    if isinstance(ctx.placement_of(container), tuple):
        return base(ctx, node)
    result = base(ctx, node)
    if isinstance(result, str) or result is None or _has_part(result[1]):
        return result
    src = ctx.placement_of(container)
    if not isinstance(src, SeqRange):
        return "a part meets the whole sequence"

    def carry(p):
        if isinstance(p, tuple):
            return tuple(carry(q) for q in p)
        return src.moved(p) if isinstance(p, Shard) else p
    return result[0], carry(result[1])


def _fallback(ctx, node, reason: str):
    """Gather every part (and shard) the node reads, run it replicated, warn (or refuse)."""
    ctx.fall_back(node, reason)

    def full(a):
        pl = ctx.placement_of(a)
        if isinstance(pl, tuple):
            raise SeqparFallbackError(f"seqpar: cannot gather a container of sequence parts ({node.name})")
        if isinstance(pl, SeqRange):
            return _gathered(ctx, a)
        return ctx.full(a)
    return ctx.emit(node.target, fx.node.map_arg(node.args, full), fx.node.map_arg(node.kwargs, full),
                    Replicate(), op=node.op), Replicate()


def _gathered(ctx, old):
    cache = ctx.parts_gathered
    if old not in cache:
        ex = ctx.example(old)
        cache[old] = gather_part(ctx, ctx.env[old], ctx.placement_of(old), ex.shape, ex.device)
    return cache[old]


def _exit(ctx, node, result):
    """A part returned by the frame leaves it as a part (a ``SequenceShard`` whose spec names its
    range: the next frame or eager code computes on each rank's rows of it) when the frame's
    outputs are SequenceShards; a chunk of merged sequences, pieces in no layout's order, or a
    frame whose outputs are plain local shards (``SEQPAR_OUTPUT=local``) gathers it."""
    if isinstance(result, str) or result is None or not _has_part(result[1]):
        return result
    if not any(u.op == "output" for u in node.users):
        return result
    new, pl = result
    if ctx.parts_leave and _leaves_as_part(pl):
        return result
    ctx.note_exit_gather(node)
    if isinstance(pl, SeqRange):
        ex = ctx.example(node)
        return gather_part(ctx, new, pl, ex.shape, ex.device), Replicate()
    if isinstance(pl, tuple) and _has_part(pl):
        ex = ctx.example(node)
        items = [gather_part(ctx, ctx.emit(operator.getitem, (new, i)), p, e.shape, e.device)
                 if isinstance(p, SeqRange) else ctx.emit(operator.getitem, (new, i))
                 for i, (p, e) in enumerate(zip(pl, ex))]
        pls = tuple(Replicate() if isinstance(p, SeqRange) else p for p in pl)
        return ctx.emit(tuple, (items,), placement=pls), pls
    return result
