"""Placements of values in a sequence-parallel graph, and how views move them.

``Shard(dim, pre, post)``: dim ``dim`` of the global value has size pre·S·post and is the
flattening of (pre, sequence, post) — pre = post = 1 for a plain sequence dim; a view that
merges batch and sequence (``logits.view(-1, V)``) gives pre = B. Locally the dim has size
pre·(S/P)·post in the same order, so flatten → pointwise → reduce stays local when both sides
are flattened alike (docs/architecture.md, "Merged dims").
``SeqRange(dim, pre, post, start, stop)``: the part of the global sequence range [start, stop)
that this rank holds, in layout order (a chunk of a chunked loss: ``h.split(n, dim=1)``). Its
local size differs between ranks and may be 0; the rewrite knows its rank, so each rank's graph
has its own sizes (``range_layout.py`` computes them from ``runtime/layout.py``). It subclasses
``Shard`` so the rewrite treats it as sharded, but only ``range_rules.py`` may compute with it.
With ``outer`` > 1 the range is over the flat index b·S + position of ``outer`` merged copies of
the sequence (a chunk of ``logits.reshape(-1, V).split(n)``: litgpt's chunked cross entropy).
``Replicate()``: the same full value on every rank.

A token grid (``[B, H·W, C] → [B, H, W, C]``, DiT's unpatchify) splits the sequence across dims.
Under a contiguous layout whose shards are whole rows (W divides S/P) each rank holds a band of
rows: the row dim is sharded with a fractional ``post`` (``Fraction(1, W)``; ``p/W`` once the
rows are merged with p pixel rows each) — global size pre·S·post, local size pre·S/P·post — and
gathering or slicing it is the contiguous layout's, applied to the dim's S·post elements
(``seq_factors``). Views that merge the grid back give a plain shard again.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from math import prod

__all__ = ["Shard", "SeqRange", "Replicate", "Partial", "Rows", "RowIndex", "RowCount", "TOKEN_LOCAL", "Placement",
           "view_placement", "local_view_shape", "seq_factors", "is_band"]


@dataclass(frozen=True)
class Shard:
    dim: int
    pre: int = 1
    post: int = 1

    @property
    def plain(self) -> bool:
        return self.pre == 1 and self.post == 1

    def __str__(self) -> str:
        return f"Shard({self.dim})" if self.plain else f"Shard({self.dim}, pre={self.pre}, post={self.post})"


def is_band(post) -> bool:
    """A fractional ``post``: the dim holds rows of a token grid (module docstring)."""
    return isinstance(post, Fraction) and post.denominator > 1


def seq_factors(pre, post, S: int) -> tuple[int, int, int]:
    """The dim of a (pre, S, post)-merged shard as three integer factors (pre, n, post), its n
    middle elements in the layout's order: the S positions themselves, or for a band of a token
    grid the S·post row elements. ``S`` may be the global or the local length."""
    if is_band(post):
        if (S * post).denominator != 1:
            raise ValueError(f"a token-grid band of {S} positions times {post} is no whole number of rows")
        return pre, int(S * post), 1
    return pre, S, int(post)


@dataclass(frozen=True)
class SeqRange(Shard):
    """This rank's part of the global positions [start, stop) along a (pre, part, post) dim."""

    start: int = 0
    stop: int = 0
    outer: int = field(default=1, kw_only=True)

    @property
    def length(self) -> int:
        return self.stop - self.start

    def moved(self, shard: Shard) -> "SeqRange":
        """The same range carried to where ``shard`` (a rule's answer for a plain shard) says."""
        return replace(self, dim=shard.dim, pre=shard.pre, post=shard.post)

    def __str__(self) -> str:
        merged = "" if self.plain else f", pre={self.pre}, post={self.post}"
        flat = "" if self.outer == 1 else f" of {self.outer} merged sequences"
        return f"{type(self).__name__}({self.dim}{merged}, [{self.start}, {self.stop}){flat})"


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "Replicate()"


@dataclass(frozen=True)
class Rows:
    """This rank's rows of a token dim (merged (pre, S, post) like ``Shard``), in the order a
    local permutation chose: a sort over this rank's tokens (``order`` names it). The same rows
    the shard holds, so row-wise work (routing an expert's tokens) is exact on them; nothing
    that depends on where a row sits may read them (``token_local.py``)."""

    dim: int
    pre: int
    post: int
    order: str

    def __str__(self) -> str:
        return f"Rows({self.dim}, pre={self.pre}, post={self.post}, order={self.order})"


@dataclass(frozen=True)
class RowIndex:
    """Integer values that index this rank's rows of a token dim with merged factors
    (``pre``, ``post``) in order ``into`` ("" for the layout's order); the index tensor's own
    positions lie as ``at`` (a ``Shard`` or ``Rows``). What a local sort's indices are."""

    at: Shard | Rows
    pre: int
    post: int
    into: str

    def __str__(self) -> str:
        return f"RowIndex(at={self.at}, into=({self.pre}, {self.post}, {self.into or 'layout'}))"


@dataclass(frozen=True)
class RowCount:
    """This rank's part of a count over the rows of order ``order`` (a histogram of its expert
    ids, its cumulative sum): used as it is by ops on those rows (grouped matmul offsets)."""

    order: str

    def __str__(self) -> str:
        return f"RowCount({self.order})"


@dataclass(frozen=True)
class Partial:
    """This rank's part of a value summed (``"sum"``) or averaged in equal shares (``"avg"``)
    over the group: the result of contracting or reducing over the sequence, before its
    all-reduce."""

    reduce: str = "sum"

    def __str__(self) -> str:
        return f"Partial({self.reduce})"


TOKEN_LOCAL = (Rows, RowIndex, RowCount)
Placement = Shard | Replicate | Rows | RowIndex | RowCount


def _groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[range, range]]:
    """Split two shapes of equal numel into aligned runs of dims with equal products."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        i0, j0 = i, j
        a = src[i] if i < len(src) else 1
        b = dst[j] if j < len(dst) else 1
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                a *= src[i]
                i += 1
            else:
                b *= dst[j]
                j += 1
        # absorb trailing size-1 dims so groups stay unambiguous
        groups.append((range(i0, min(i, len(src))), range(j0, min(j, len(dst)))))
    return groups


def view_placement(src: tuple[int, ...], dst: tuple[int, ...], shard: Shard, S: int, *,
                   rows_allowed=None) -> Shard | None:
    """Where the sequence lands after viewing a ``src``-shaped value as ``dst``; None if it is
    split across output dims in a way a shard cannot express.

    ``rows_allowed(post)``: whether the layout keeps a dim of S·post elements in position order
    sharded as a band (``Layout.keeps_band``); given, a view that splits the sequence into rows
    (a token grid) shards the row dim with that fractional ``post``. Without it such a view is
    refused, as for zigzag and striped shards, which are no band of rows."""
    for g_src, g_dst in _groups(tuple(src), tuple(dst)):
        if shard.dim not in g_src:
            continue
        pre_total = prod(src[g_src.start:shard.dim]) * shard.pre
        post_total = shard.post * prod(src[shard.dim + 1:g_src.stop])
        for o in g_dst:
            before, after = prod(dst[g_dst.start:o]), prod(dst[o + 1:g_dst.stop])
            if pre_total % before or post_total % after:
                continue
            pre_o, post_o = pre_total // before, post_total // after
            if dst[o] == pre_o * S * post_o:
                return Shard(o, int(pre_o), int(post_o))
        if rows_allowed is None:
            return None
        for o in g_dst:
            before, after = prod(dst[g_dst.start:o]), prod(dst[o + 1:g_dst.stop])
            if pre_total % before:
                continue
            pre_o, post_o = pre_total // before, Fraction(post_total) / after
            if post_o.denominator > 1 and dst[o] == pre_o * S * post_o and rows_allowed(post_o):
                return Shard(o, int(pre_o), post_o)
        return None
    return None


def local_view_shape(dst: tuple[int, ...], shard: Shard, P: int) -> list[int]:
    """This rank's shape of a ``dst``-shaped value placed ``shard`` (its dim split P ways)."""
    shape = list(dst)
    shape[shard.dim] //= P
    return shape
