"""Which local rows hold a part of the global sequence, and the graph pieces that move between a
part, the whole shard and a replicated value (chunked losses).

A ``SeqRange(dim, pre, post, start, stop)`` value (``placement.py``) holds this rank's tokens
whose global positions fall in [start, stop), in layout order. Which positions a rank holds comes
from ``runtime/layout.py`` (``local_positions``) and nowhere else, so a part and the ring can
never disagree about where a token lives. Every rank's graph is rewritten for its own rank, so
the local sizes here are plain Python ints (they differ between ranks and may be 0), while the
collectives stay the same on every rank (each rank emits the same ones in the same order).

Reads ``ctx`` (``rewrite.ShardingContext``: S, P, rank, schedule, the new graph); writes nodes
into the new graph. Shapes: ``L = stop − start`` (the part's global length), ``n`` (this rank's
rows of it), merged dims are (pre, L or n, post) flattened.
"""
from __future__ import annotations

import operator
from functools import lru_cache
import torch
import torch.fx as fx

from seqpar_compiler.runtime import local_positions
from seqpar_compiler.runtime.layout import layout_of

from .placement import Replicate, SeqRange, Shard

__all__ = ["part_positions", "local_count", "sub_range", "take_rows", "slice_replicated", "take_part_rows", "gather_part",
           "normalize", "local_shape", "flat_source"]

shard_sequence_op = torch.ops.seqpar.shard_sequence.default
gather_sequence_op = torch.ops.seqpar.gather_sequence.default


@lru_cache(maxsize=256)
def _positions(schedule: str, rank: int, P: int, S: int) -> tuple[int, ...]:
    return tuple(local_positions(schedule, rank, P, S).tolist())


def _bounds(ctx, pl: Shard) -> tuple[int, int]:
    return (pl.start, pl.stop) if isinstance(pl, SeqRange) else (0, ctx.S)


def _outer(pl: Shard) -> int:
    return pl.outer if isinstance(pl, SeqRange) else 1


def part_positions(ctx, pl: Shard) -> tuple[int, ...]:
    """Global positions of this rank's rows of a value placed ``pl``, in local order (flat
    indices b·S + position over ``outer`` merged sequences: local rows are b-major). A range of
    one sequence is ``Layout.part_rows``'s answer, the one the eager path uses."""
    lo, hi = _bounds(ctx, pl)
    if _outer(pl) == 1:
        return tuple(lo + o for o in layout_of(ctx.schedule).part_rows(ctx.rank, ctx.P, ctx.S, lo, hi)[1])
    mine = _positions(ctx.schedule, ctx.rank, ctx.P, ctx.S)
    return tuple(f for b in range(_outer(pl)) for p in mine if lo <= (f := b * ctx.S + p) < hi)


def flat_source(ctx, pl: Shard) -> SeqRange:
    """A shard merged with the batch before it (``[B·S, ...]``: pre = B, post = 1) as the whole
    flat range of its B merged sequences, so it can be cut into chunks of the flat dim."""
    return SeqRange(pl.dim, 1, 1, 0, pl.pre * ctx.S, outer=pl.pre)


def local_count(ctx, pl: Shard) -> int:
    return len(part_positions(ctx, pl))


def normalize(ctx, pl: SeqRange) -> Shard:
    """A part that is the whole sequence is a plain shard (its rows are all of this rank's);
    the whole of ``outer`` merged sequences is a shard merged with what came before it."""
    if pl.start == 0 and pl.stop == pl.outer * ctx.S:
        return Shard(pl.dim, pl.pre * pl.outer, pl.post)
    return pl


def sub_range(ctx, pl: Shard, a: int, b: int) -> tuple[Shard, list[int]]:
    """The part [a, b) (relative to ``pl``'s own range) of a value placed ``pl``: its placement
    and which of ``pl``'s local rows hold it."""
    lo, _ = _bounds(ctx, pl)
    new = normalize(ctx, SeqRange(pl.dim, pl.pre, pl.post, lo + a, lo + b, outer=_outer(pl)))
    rows = [i for i, p in enumerate(part_positions(ctx, pl)) if lo + a <= p < lo + b]
    return new, rows


def local_shape(ctx, global_shape, pl: Shard) -> list[int]:
    """This rank's shape of a value of ``global_shape`` placed ``pl``."""
    shape = list(global_shape)
    shape[pl.dim] = pl.pre * local_count(ctx, pl) * pl.post
    return shape


def take_rows(ctx, new: fx.Node, dim: int, rows: list[int], size: int, device=None) -> fx.Node:
    """Rows ``rows`` (sorted) of ``new`` along ``dim`` (of local size ``size``), cheapest first:
    all of them, none, a contiguous run (narrow), a strided run, any (index_select)."""
    if rows == list(range(size)):
        return new
    if not rows:
        return ctx.emit(torch.narrow, (new, dim, 0, 0))
    step = rows[1] - rows[0] if len(rows) > 1 else 1
    if rows == list(range(rows[0], rows[-1] + 1, step)):
        if step == 1:
            return ctx.emit(torch.narrow, (new, dim, rows[0], len(rows)))
        index = (slice(None),) * dim + (slice(rows[0], rows[-1] + 1, step),)
        return ctx.emit(operator.getitem, (new, index))
    idx = ctx.constant("part_rows", torch.tensor(rows, dtype=torch.long, device=device))
    idx.meta["seqpar_placement"] = Replicate()
    return ctx.emit(torch.index_select, (new, dim, idx))


def _unmerged(ctx, new, shape: list[int], dim: int, pre: int, n: int, post: int) -> fx.Node:
    split = shape[:dim] + [pre, n, post] + shape[dim + 1:]
    return ctx.emit("reshape", (new, split), op="call_method")


def slice_replicated(ctx, old: fx.Node, dim: int, pl: SeqRange) -> fx.Node:
    """A replicated value whose ``dim`` is the part's global range (pre·L·post) as this rank's
    rows of it. The slice's gradient is partial (this rank's rows), so it is summed over the
    group first (``ctx.weight``): the ranks' rows partition the range, each counted once."""
    ex = ctx.example(old)
    return take_part_rows(ctx, ctx.weight(old), list(ex.shape), dim, pl, ex.device)


def take_part_rows(ctx, new: fx.Node, shape: list[int], dim: int, pl: SeqRange, device=None) -> fx.Node:
    """This rank's rows of the part ``pl`` from ``new``, a whole value of ``shape`` whose ``dim``
    is the part's global range (pre·L·post), placed ``pl`` (its gradient, if it needs one, is
    the caller's to sum: each rank takes other rows)."""
    lo, _ = _bounds(ctx, pl)
    rows = [p - lo for p in part_positions(ctx, pl)]
    if pl.plain:
        out = take_rows(ctx, new, dim, rows, shape[dim], device)
    else:
        out = take_rows(ctx, _unmerged(ctx, new, shape, dim, pl.pre, pl.length, pl.post), dim + 1, rows, pl.length,
                        device)
        out = ctx.emit("reshape", (out, local_shape(ctx, shape, pl)), op="call_method")
    out.meta["seqpar_placement"] = pl
    return out


def gather_part(ctx, new: fx.Node, pl: SeqRange, global_shape, device=None) -> fx.Node:
    """The whole part [start, stop) on every rank (natural order), from each rank's rows: the
    rows are put back in place in a zero local shard, the shard is gathered (its backward is
    this rank's slice, no communication) and the range cut out. Gathers S rows, not L: this is
    the fallback, not the fast path."""
    if pl.outer > 1:
        return _gather_flat_part(ctx, new, pl, global_shape, device)
    shape = list(global_shape)
    n, S_local = local_count(ctx, pl), ctx.S // ctx.P
    d = pl.dim if pl.plain else pl.dim + 1
    x = new if pl.plain else _unmerged(ctx, new, local_shape(ctx, shape, pl), pl.dim, pl.pre, n, pl.post)
    xshape = list(shape) if pl.plain else shape[:pl.dim] + [pl.pre, pl.length, pl.post] + shape[pl.dim + 1:]
    rows = list(layout_of(ctx.schedule).part_rows(ctx.rank, ctx.P, ctx.S, pl.start, pl.stop)[0])
    zeros_shape = list(xshape)
    zeros_shape[d] = S_local
    if rows and rows == list(range(rows[0], rows[0] + n)):
        parts = []
        for count in (rows[0], S_local - rows[0] - n):
            if count:
                zshape = list(xshape)
                zshape[d] = count
                parts.append(ctx.emit("new_zeros", (x, zshape), op="call_method"))
        pieces = parts[:1] + [x] + parts[1:] if rows[0] else [x] + parts
        shard = ctx.emit(torch.cat, (pieces, d)) if len(pieces) > 1 else x
    else:
        zeros = ctx.emit("new_zeros", (x, zeros_shape), op="call_method")
        if rows:
            idx = ctx.constant("part_rows", torch.tensor(rows, dtype=torch.long, device=device))
            idx.meta["seqpar_placement"] = Replicate()
            shard = ctx.emit("index_copy", (zeros, d, idx, x), op="call_method")
        else:
            shard = zeros
    ctx.collectives.append(f"all-gather {new.name} (a part of the sequence)")
    full = ctx.emit(gather_sequence_op, (shard, d, ctx.schedule, ctx.group_name))
    out = ctx.emit(torch.narrow, (full, d, pl.start, pl.length))
    if not pl.plain:
        out = ctx.emit("reshape", (out, shape), op="call_method")
    out.meta["seqpar_placement"] = Replicate()
    return out


def _gather_flat_part(ctx, new: fx.Node, pl: SeqRange, global_shape, device=None) -> fx.Node:
    """``gather_part`` of a range of ``outer`` merged sequences (a plain dim of flat indices):
    this rank's rows put back in a zero merged shard [outer·S/P], gathered as [outer, S], and
    the flat range cut out."""
    if not pl.plain:
        raise ValueError("a chunk of merged sequences that is merged again")
    shape, d = list(global_shape), pl.dim
    S_local = ctx.S // ctx.P
    every = part_positions(ctx, SeqRange(d, 1, 1, 0, pl.outer * ctx.S, outer=pl.outer))
    rows = [i for i, f in enumerate(every) if pl.start <= f < pl.stop]
    zeros_shape = shape[:d] + [pl.outer * S_local] + shape[d + 1:]
    shard = ctx.emit("new_zeros", (new, zeros_shape), op="call_method")
    if rows:
        idx = ctx.constant("part_rows", torch.tensor(rows, dtype=torch.long, device=device))
        idx.meta["seqpar_placement"] = Replicate()
        shard = ctx.emit("index_copy", (shard, d, idx, new), op="call_method")
    shard = ctx.emit("reshape", (shard, shape[:d] + [pl.outer, S_local] + shape[d + 1:]), op="call_method")
    ctx.collectives.append(f"all-gather {new.name} (a chunk of merged sequences)")
    full = ctx.emit(gather_sequence_op, (shard, d + 1, ctx.schedule, ctx.group_name))
    full = ctx.emit("reshape", (full, shape[:d] + [pl.outer * ctx.S] + shape[d + 1:]), op="call_method")
    out = ctx.emit(torch.narrow, (full, d, pl.start, pl.length))
    out.meta["seqpar_placement"] = Replicate()
    return out
