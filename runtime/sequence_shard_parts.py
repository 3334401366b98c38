"""Parts of the sequence between frames: ``split`` / ``chunk`` / ``x[:, a:b]`` of a ``SequenceShard``
along its sequence dim, the ``cat`` that joins them back, and ``x[:, i]`` (a one-position part,
gathered).

Why: a chunked loss written eagerly (torchtune's ``chunked_output``, a ``torch.compiler.disable``d
method: ``[self.output(c) for c in h.chunk(n, dim=1)]``) splits the sequence between compiled
frames. Gathered, the output projection and the loss would run on every rank for every token.
A chunk is instead a ``SequenceShard`` whose spec names its positions (``ShardSpec.part``): each
rank holds its own tokens of the chunk, in local order, possibly none. Ops that treat positions
alike run on it as on a whole shard (the sharding core's plan with the part's local length:
linears, norms, log-softmax, cross entropy with its global count), a compiled frame that receives
it seeds the compiled rewrite's part placement (``SeqRange``, ``passes/range_rules.py``), and
anything that needs the layout's runs gathers the part, warned.

The backward of a split is a ``cat`` of the chunks' gradients (zeros for a chunk no loss used);
that of a slice is ``slice_backward``: both give the whole shard back without communication.
Which rank holds which token of a part comes from ``Layout.part_rows`` only, the same answer the
compiled rewrite uses.

A dim merged with the batch (``logits.reshape(-1, V)``: ``[B·S, V]``) split across the batch
rows, and shards joined in any order (litgpt's per-chunk losses, chunk by chunk), are parts of a
``Blocks`` layout, which lists the blocks of the sequence their rows come from: the same part
rules then apply to them.

Shape legend: S global sequence length; a part [start, stop) spans L = stop − start positions,
this rank holds n of them; its dim has global size L·post and local size n·post (pre = 1: the
sequence is the outer factor of the dim; a dim merged with the batch, pre = B, is cut as the
``Blocks`` it is).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .layout import layout_of
from .sequence_shard import SequenceShard, ShardSpec, _unmerged, gather_local, slice_local
from .sharding.layout import Blocks
from .sequence_shard_rules import _planned, _rule

__all__ = ["same_rows"]

aten = torch.ops.aten


def _splittable(x, dim) -> ShardSpec | None:
    """The spec of ``x`` when ``dim`` is its sequence dim with the sequence outermost (pre = 1,
    whole positions per element run), else None (the core plans it or it gathers)."""
    if not isinstance(x, SequenceShard):
        return None
    spec = x.spec
    if dim % x.dim() != spec.dim or spec.pre != 1 or not isinstance(spec.post, int) or isinstance(spec.S, torch.SymInt):
        return None
    return spec


def _cuttable(x, dim) -> ShardSpec | None:
    """``_splittable``, and also a sequence dim merged with the batch (``[B·S, V]``, pre > 1),
    seen as the ``Blocks`` it is: a split across the batch rows is a part of those rows."""
    s = _splittable(x, dim)
    if s is not None or not isinstance(x, SequenceShard):
        return s
    spec = x.spec
    if dim % x.dim() != spec.dim or not isinstance(spec.post, int) or isinstance(spec.S, torch.SymInt):
        return None
    return _as_blocks(spec)


def _as_blocks(spec: ShardSpec) -> ShardSpec:
    """``spec`` (a whole sequence or a part, merged with ``pre`` batch rows) as a part of a
    ``Blocks`` layout listing the same local rows in the same order (pre = 1)."""
    if not layout_of(spec.schedule).balanced:
        return spec
    start, stop = spec.part or (0, spec.S)
    rows = _blocks_layout(spec.schedule, spec.S, ((start, stop, spec.pre),))
    return ShardSpec(spec.dim, rows.length, rows, spec.group_name, 1, spec.post, spec.grad_reduce, (0, rows.length))


def same_rows(a: ShardSpec, b: ShardSpec) -> bool:
    """Do two specs name the same local rows in the same order? A join of parts is named as a
    plain shard (``_cat_blocks``) while the backward's cut of it is named as parts again, so one
    value can reach an op under both names."""
    if a == b:
        return True
    if (a.dim, a.group_name, a.post, a.grad_reduce) != (b.dim, b.group_name, b.post, b.grad_reduce):
        return False
    if any(not isinstance(s.post, int) or isinstance(s.S, torch.SymInt) for s in (a, b)):
        return False
    ra, rb = (layout_of(_normal(_as_blocks(s)).schedule) for s in (a, b))
    return (ra.base, ra.S, ra.blocks) == (rb.base, rb.S, rb.blocks)


def _blocks_layout(schedule, S: int, blocks) -> Blocks:
    return Blocks(f"blocks of {schedule}", str(schedule), S, tuple(blocks))


def _normal(spec: ShardSpec, whole: bool = False) -> ShardSpec:
    """A part of a ``Blocks`` value as the ``Blocks`` of just its rows (its own blocks, the range
    all of them); with ``whole``, as the plain spec (whole sequence or part, merged with the
    batch) when its rows are one block: a joined value is then a shard like any other."""
    rows = layout_of(spec.schedule)
    if rows.balanced:
        return spec
    a, b = spec.part
    blocks, at = [], 0
    for start, stop, times in rows.blocks:
        n = stop - start
        for _ in range(times):
            lo, hi = max(a, at), min(b, at + n)
            if lo < hi:
                blocks.append((start + lo - at, start + hi - at, 1))
            at += n
    blocks = _merged_blocks(blocks, rows.base, rows.S, spec.P)
    if whole and len(blocks) == 1:
        start, stop, times = blocks[0]
        return ShardSpec(spec.dim, rows.S, rows.base, spec.group_name, times, spec.post,
                         spec.grad_reduce).with_part((start, stop))
    joined = _blocks_layout(rows.base, rows.S, blocks)
    return ShardSpec(spec.dim, joined.length, joined, spec.group_name, 1, spec.post, spec.grad_reduce,
                     (0, joined.length))


def _merged_blocks(blocks: list, base, S: int, P: int) -> list:
    """Neighbouring blocks joined: consecutive ranges read once each (when every rank's rows run
    in increasing position, so one range's rows are the two ranges' rows in order), then repeats
    of one range counted."""
    layout = layout_of(base)
    increasing = all(layout.increasing(r, P, S) for r in range(P))
    ranges = []
    for start, stop, times in blocks:
        if increasing and ranges and times == 1 and ranges[-1][2] == 1 and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop, 1)
        else:
            ranges.append((start, stop, times))
    out = []
    for start, stop, times in ranges:
        if out and out[-1][:2] == (start, stop):
            out[-1] = (start, stop, out[-1][2] + times)
        else:
            out.append((start, stop, times))
    return out


def _rows_of(spec: ShardSpec, a: int, b: int) -> list[int]:
    """Which of the value's local rows (positions, in local order) hold its offsets [a, b)."""
    _, offsets = spec.part_rows()
    return [j for j, o in enumerate(offsets) if a <= o < b]


def _take(x: SequenceShard, spec: ShardSpec, rows: list[int]) -> Tensor:
    """The local rows ``rows`` of ``x`` (a view when they are one run)."""
    post = spec.post
    local = x._local
    if not rows:
        return local.narrow(spec.dim, 0, 0)
    if rows == list(range(rows[0], rows[-1] + 1)):
        return local.narrow(spec.dim, rows[0] * post, len(rows) * post)
    unmerged = _unmerged(local, spec, spec.local_length)
    picked = unmerged.index_select(spec.dim + 1, torch.tensor(rows, device=local.device))
    shape = list(local.shape)
    shape[spec.dim] = len(rows) * post
    return picked.reshape(shape)


def _pieces(x: SequenceShard, spec: ShardSpec, bounds: list[tuple[int, int]]) -> list[SequenceShard]:
    """``x`` cut at the element ``bounds`` of its sequence dim into parts; NotImplemented when a
    bound falls inside a position's elements."""
    post, lo = spec.post, (spec.part or (0, spec.S))[0]
    out = []
    for a, b in bounds:
        if a % post or b % post:
            return NotImplemented
        pa, pb = a // post, b // post
        child = _normal(spec.with_part((lo + pa, lo + pb)))
        out.append(SequenceShard(_take(x, spec, _rows_of(spec, pa, pb)), child))
    return out


@_rule(aten.split.Tensor, aten.unsafe_split.Tensor)
def _split(func, spec, x, split_size, dim=0):
    s = _cuttable(x, dim)
    if s is None:
        return _planned(func, [x], (x, split_size, dim), {})
    size = x.shape[s.dim]
    return _pieces(x, s, [(a, min(a + split_size, size)) for a in range(0, size, split_size)] or [(0, 0)])


@_rule(aten.split_with_sizes.default, aten.unsafe_split_with_sizes.default)
def _split_with_sizes(func, spec, x, sizes, dim=0):
    s = _cuttable(x, dim)
    if s is None:
        return _planned(func, [x], (x, sizes, dim), {})
    bounds, at = [], 0
    for n in sizes:
        bounds.append((at, at + n))
        at += n
    return _pieces(x, s, bounds)


@_rule(aten.slice.Tensor)
def _slice(func, spec, x, dim=0, start=None, end=None, step=1):
    s = _cuttable(x, dim) if step == 1 else None
    if s is None:
        return _planned(func, [x], (x, dim, start, end, step), {})
    size = x.shape[dim]
    a = 0 if start is None else (start + size if start < 0 else start)
    b = size if end is None else (end + size if end < 0 else end)
    a, b = max(0, min(a, size)), max(0, min(b, size))
    if (a, b) == (0, size):
        return _planned(func, [x], (x, dim, start, end, step), {})
    pieces = _pieces(x, s, [(a, max(a, b))])
    return pieces if pieces is NotImplemented else pieces[0]


@_rule(aten.cat.default)
def _cat(func, spec, tensors, dim=0):
    """Parts joined along the sequence dim: consecutive parts of one sequence as that range
    (``_cat_parts``), else shards of one sequence in any order and merged with the batch or not
    as the ``Blocks`` they make (``_cat_blocks``); anything else as the core plans it."""
    shards = [t for t in tensors if isinstance(t, SequenceShard)]
    if _cuttable(shards[0], dim) is None:
        return _planned(func, shards, (tensors, dim), {})
    out = _cat_parts(tensors, dim) if _splittable(shards[0], dim) is not None else NotImplemented
    return _cat_blocks(tensors, dim) if out is NotImplemented else out


def _cat_blocks(tensors, dim):
    """Every operand a shard of one sequence along ``dim`` (a part, a batch-merged dim, rows):
    the local rows joined in operand order are this rank's rows of the ``Blocks`` whose blocks are
    the operands' blocks in that order (a plain spec again when they make one block)."""
    if not all(isinstance(t, SequenceShard) for t in tensors):
        return NotImplemented           # a plain operand's rows belong to no rank
    if any(t.spec.part is None and t.spec.pre == 1 for t in tensors):
        # a whole sequence joined to more (a longer sequence made between frames): gathered, so
        # the frame that receives it shards it at its own length
        return NotImplemented
    specs = [_cuttable(t, dim) for t in tensors]
    if any(s is None for s in specs):
        return NotImplemented
    specs = [_as_blocks(s) for s in specs]
    first = layout_of(specs[0].schedule)
    key = (first.base, first.S, specs[0].group_name, specs[0].post, specs[0].grad_reduce)
    blocks = []
    for s in specs:
        rows = layout_of(_normal(s).schedule)
        if (rows.base, rows.S, s.group_name, s.post, s.grad_reduce) != key:
            return NotImplemented       # shards of different sequences, groups or widths
        blocks.extend(rows.blocks)
    joined = _blocks_layout(first.base, first.S, blocks)
    spec = ShardSpec(specs[0].dim, joined.length, joined, specs[0].group_name, 1, specs[0].post,
                     specs[0].grad_reduce, (0, joined.length))
    return SequenceShard(torch.cat([t._local for t in tensors], spec.dim), _normal(spec, whole=True))


def _cat_parts(tensors, dim):
    """Parts (and plain values standing for the parts between them) concatenated along the
    sequence dim in position order: each rank's rows of them, in order, are its rows of the
    joined range, when its local order runs in increasing position (every layout but a hybrid
    one's)."""
    shards = [t for t in tensors if isinstance(t, SequenceShard)]
    first = shards[0]
    s = _splittable(first, dim)
    post = s.post
    if any(_splittable(t, dim) is None or (t.spec.S, t.spec.schedule, t.spec.group_name, t.spec.post)
           != (s.S, s.schedule, s.group_name, post) for t in shards):
        return NotImplemented
    from .layout import layout_of
    layout = layout_of(s.schedule)
    if not all(layout.increasing(r, s.P, s.S) for r in range(s.P)):    # every rank decides alike
        return NotImplemented
    lengths = []
    for t in tensors:
        if t.shape[s.dim] % post:
            return NotImplemented
        lengths.append(t.shape[s.dim] // post)
    k = next(i for i, t in enumerate(tensors) if isinstance(t, SequenceShard))
    lo = (first.spec.part or (0, s.S))[0] - sum(lengths[:k])
    at, locals_ = lo, []
    for t, n in zip(tensors, lengths):
        if at < 0 or at + n > s.S:
            return NotImplemented
        if isinstance(t, SequenceShard):
            if (t.spec.part or (0, s.S)) != (at, at + n):
                return NotImplemented               # not consecutive parts of one sequence
            locals_.append(t._local)
        else:
            locals_.append(slice_local(t, s.with_part((at, at + n))))
        at += n
    joined = s.with_part((lo, at))
    return SequenceShard(torch.cat(locals_, s.dim), joined)


@_rule(aten.select.int)
def _select(func, spec, x, dim, index):
    """One position of the sequence (``logits[:, -1]``, a classification token): the one-position
    part holding it, gathered (its row summed over the group, zeros elsewhere), not the whole
    sequence. The result is a plain tensor, the same on every rank."""
    s = _cuttable(x, dim)
    size = x.shape[dim]
    if s is None or not -size <= index < size:
        return _planned(func, [x], (x, dim, index), {})
    position, element = divmod(index % size, s.post)
    pieces = _pieces(x, s, [(position * s.post, (position + 1) * s.post)])
    if pieces is NotImplemented:
        return NotImplemented
    return gather_local(pieces[0]._local, pieces[0].spec).select(s.dim, element)


@_rule(aten.slice_backward.default)
def _slice_backward(func, spec, grad, input_sizes, dim, start, end, step):
    """The gradient of ``x[:, a:b]`` (a part of ``x``) back at ``x``: zeros where no row of the
    part lies, the part's rows at theirs; ``x``'s range follows from the part's and ``a``."""
    s = _splittable(grad, dim) if step == 1 else None
    if s is not None and not layout_of(s.schedule).balanced:
        return NotImplemented      # rows of a batch-merged dim: which rows the input held is not known here
    if s is None or s.part is None:
        return _planned(func, [grad], (grad, input_sizes, dim, start, end, step), {})
    size, post = input_sizes[s.dim], s.post
    a = 0 if start is None else (start + size if start < 0 else start)
    if size % post or a % post:
        return NotImplemented
    lo = s.part[0] - a // post
    whole = s.with_part((lo, lo + size // post))
    rows = _rows_of(whole, a // post, a // post + s.length)
    shape = list(grad._local.shape)
    shape[s.dim] = whole.local_length * post
    out = grad._local.new_zeros(shape)
    if rows:
        target = _unmerged(out, whole, whole.local_length)
        target.index_copy_(s.dim + 1, torch.tensor(rows, device=out.device),
                           _unmerged(grad._local, s, s.local_length))
    return SequenceShard(out, whole)
