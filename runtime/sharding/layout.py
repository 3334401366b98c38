"""Sequence layouts as objects: which global positions each rank holds, decided in one place.

The ring (global positions of the local query and key rows), the graph passes (slicing a
replicated tensor into a rank's part), the sharding core (may a view split the sequence dim?)
and the cost models all ask a ``Layout``, so they cannot disagree. A layout is named by the
schedule option users type; ``layout_of`` parses that name once, with an error naming the
allowed values, and returns the object (cached: one object per name).

Layouts (S global length, P ranks, chunks of S/(2P) tokens):
  contiguous (ring, distflash, ulysses)  rank r holds [r·S/P, (r+1)·S/P)
  zigzag      rank r holds chunk r followed by chunk 2P−1−r
  striped     rank r holds r, r+P, r+2P, …
  hybrid:u    G = P/u groups of u consecutive ranks; group g holds zigzag(G) chunks g and
              2G−1−g (chunks of S/(2G)), split contiguously over its u ranks, so the
              all-to-all inside a group hands each rank exactly ring rank g's zigzag shard
  Blocks      not a schedule: the rows of a value cut from one of the above and rearranged
              (a batch-merged dim split across batch rows, shards joined in another order);
              ranks hold different counts of them

A rank's tokens are a short list of affine ``Segment``s (start, count, stride), which is what
block masks need: global position of local row i of a segment = start + i·stride.
"""
from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["Layout", "Contiguous", "Zigzag", "Striped", "Hybrid", "Blocks", "Segment", "layout_of", "SCHEDULES",
           "A2A_SCHEDULES", "ALLOWED"]

# the ring's schedules (their layouts: contiguous, zigzag, striped, contiguous)
SCHEDULES = ("ring", "zigzag", "striped", "distflash")
# the all-to-all attention's layouts; the hybrid's name carries its Ulysses degree u
A2A_SCHEDULES = ("ulysses", "hybrid")
ALLOWED = "ring, zigzag, striped, distflash, ulysses, hybrid:u (u = the Ulysses degree)"


@dataclass(frozen=True)
class Segment:
    """Local rows ``[offset, offset + count)`` hold global positions ``start + i * stride``."""

    offset: int
    start: int
    count: int
    stride: int = 1


@dataclass(frozen=True)
class Layout:
    """Where each global position of the sequence lives.

    Attributes:
        name: the schedule's name as users type it (``"zigzag"``, ``"hybrid:2"``); what graphs
            and custom ops carry, so a layout crosses ``torch.library`` boundaries as a string.
    """

    name: str

    kind = "abstract"
    all_to_all = False        # attention by all-to-all (Ulysses) instead of a ring
    contiguous = False        # rank r holds one run of positions, ranks in order
    # every rank holds S/P of the positions; False (``Blocks``): ranks hold different counts, and a
    # value in this layout always names the range it holds (``ShardSpec.part``)
    balanced = True

    def __str__(self) -> str:
        return self.name

    # -- sizes ------------------------------------------------------------------------------
    def required_multiple(self, P: int) -> int:
        """The global sequence length must be a multiple of this."""
        return P

    def check_length(self, S: int, P: int, *, what: str = "sequence length") -> None:
        """A clear error when ``S`` cannot be split as this layout needs on ``P`` ranks."""
        m = self.required_multiple(P)
        if S % m:
            why = " (each rank holds two chunks)" if self.kind == "zigzag" else ""
            raise ValueError(f"{what} {S} cannot be split by schedule {self.name!r} over {P} ranks: it must be "
                             f"a multiple of {m}{why}; pad the sequence to a multiple of {m}")

    def ulysses_degree(self, P: int) -> int:
        """The all-to-all degree this layout implies (P for ``ulysses``, u for ``hybrid:u``)."""
        raise ValueError(f"all-to-all attention takes schedule 'ulysses' or 'hybrid:u' (u = the Ulysses degree, "
                         f"dividing the group size {P}); got {self.name!r}")

    # -- positions --------------------------------------------------------------------------
    def segments(self, rank: int, P: int, S_local: int) -> tuple[Segment, ...]:
        """The affine segments of rank ``rank``'s ``S_local`` rows, in local order (cached for
        concrete lengths; a symbolic one, met while Dynamo traces a frame at a dynamic length,
        cannot be hashed and is computed each time)."""
        if P == 1:
            return (Segment(0, 0, S_local),)
        if isinstance(S_local, torch.SymInt):
            return self._segments(rank, P, S_local)
        return _cached_segments(self, rank, P, S_local)

    def _segments(self, rank: int, P: int, S_local: int) -> tuple[Segment, ...]:
        raise NotImplementedError

    def positions(self, rank: int, P: int, S: int, device=None) -> torch.Tensor:
        """Global positions [S/P] of rank ``rank``'s tokens, in local order (int64)."""
        self.check_length(S, P)
        parts = [seg.start + torch.arange(seg.count, device=device) * seg.stride
                 for seg in self.segments(rank, P, S // P)]
        return torch.cat(parts)

    def part_rows(self, rank: int, P: int, S: int, start: int, stop: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Rank ``rank``'s tokens at global positions [start, stop) (a chunk of a chunked loss):
        their indices among its S/P local rows and their offsets from ``start``, both in local
        order. The one place a part's rows are worked out, so the eager and the compiled path
        agree on where each token of a part lives."""
        return _cached_part_rows(self, rank, P, S, start, stop)

    def increasing(self, rank: int, P: int, S: int) -> bool:
        """Do this rank's local rows run in increasing global position? Then the parts of a
        sequence, concatenated in position order, are its local rows in order."""
        return P == 1 or _cached_increasing(self, rank, P, S)

    def local_part(self, x: torch.Tensor, dim: int, rank: int, P: int) -> torch.Tensor:
        """Rank ``rank``'s part of a replicated ``x`` along its sequence dim ``dim`` (a copy)."""
        if P == 1:
            return x.clone()
        if self.contiguous:
            n = x.shape[dim] // P
            return x.narrow(dim, rank * n, n).clone()
        return x.index_select(dim, self.positions(rank, P, x.shape[dim], device=x.device))

    def keeps_band(self, S: int, P: int, per_position) -> bool:
        """May a dim of ``S · per_position`` elements in position order (rows of a token grid:
        ``per_position = 1/W``; rows of pixels of patches: ``p/W``) stay sharded? Only when each
        rank holds one run of positions, ranks in order, and that run ends on an element
        boundary (``S/P · per_position`` whole): then rank r's elements are the r-th of P equal
        chunks of the dim, exactly its positions' data."""
        return self.contiguous and S % P == 0 and (Fraction(S // P) * per_position).denominator == 1


@dataclass(frozen=True)
class Contiguous(Layout):
    """Rank r holds positions [r·S/P, (r+1)·S/P): the ring, distflash and ulysses schedules."""

    kind = "contiguous"
    contiguous = True

    @property
    def all_to_all(self) -> bool:
        return self.name == "ulysses"

    def ulysses_degree(self, P: int) -> int:
        return P if self.name == "ulysses" else super().ulysses_degree(P)

    def _segments(self, rank, P, S_local):
        return (Segment(0, rank * S_local, S_local),)


@dataclass(frozen=True)
class Zigzag(Layout):
    """Rank r holds chunk r then chunk 2P−1−r of 2P equal chunks (balances causal work)."""

    kind = "zigzag"

    def required_multiple(self, P):
        return 2 * P if P > 1 else P

    def _segments(self, rank, P, S_local):
        if S_local % 2:
            raise ValueError(f"zigzag needs an even local length (global length a multiple of {2 * P}); "
                             f"got S_local={S_local}")
        c = S_local // 2
        return (Segment(0, rank * c, c), Segment(c, (2 * P - 1 - rank) * c, c))


@dataclass(frozen=True)
class Striped(Layout):
    """Rank r holds positions r, r+P, r+2P, …"""

    kind = "striped"

    def _segments(self, rank, P, S_local):
        return (Segment(0, rank, S_local, P),)


@dataclass(frozen=True)
class Hybrid(Layout):
    """Ulysses × ring: ``u`` consecutive ranks share one zigzag(P/u) shard, split contiguously."""

    u: int = 1
    kind = "hybrid"
    all_to_all = True

    def required_multiple(self, P):
        G = max(P // self.u, 1)
        return P if G == 1 else math.lcm(P, 2 * G)

    def ulysses_degree(self, P):
        return self.u

    def _segments(self, rank, P, S_local):
        """Rank ``rank`` = g·u + j holds rows [j·S_local, (j+1)·S_local) of ring rank g's
        zigzag(G) shard (``S_local·u`` rows): the pieces of its two chunks that fall in that range."""
        u = self.u
        if P % u:
            raise ValueError(f"hybrid: the Ulysses degree {u} must divide the group size {P}")
        g, j = divmod(rank, u)
        ring_segs = _ZIGZAG.segments(g, P // u, S_local * u)
        lo, hi, out = j * S_local, (j + 1) * S_local, []
        for seg in ring_segs:
            a, b = max(lo, seg.offset), min(hi, seg.offset + seg.count)
            if a < b:
                out.append(Segment(a - lo, seg.start + (a - seg.offset) * seg.stride, b - a, seg.stride))
        return tuple(out)


@dataclass(frozen=True)
class Blocks(Layout):
    """The rows of a value cut from the sequence and rearranged: a sequence dim merged with the
    batch (``logits.reshape(-1, V)``: ``[B·S, V]``) and split across the batch rows
    (``.split(n)``), or parts of it concatenated in another order (``torch.cat`` of per-chunk
    losses). Its positions index the value's rows, which lie in ``blocks`` of the ``base``
    layout's sequence of length ``S``: block (start, stop, times) is positions [start, stop)
    repeated ``times`` times (once per batch row), blocks and repeats in order. Each rank holds
    its own tokens of every block, in its local order; the counts differ between ranks
    (``balanced`` False), so values in this layout always carry their range.

    Why a layout: every rule that works on a part (the sharding core with the part's local
    count, the zero-padded gather, the cut of a replicated operand) asks the layout which rows a
    rank holds; a layout that lists them makes a merged or reordered value one more part.
    """

    base: str = "zigzag"           # the schedule name of the sequence the rows come from
    S: int = 0
    blocks: tuple = ()

    kind = "blocks"
    balanced = False

    @property
    def length(self) -> int:
        return sum((stop - start) * times for start, stop, times in self.blocks)

    def positions(self, rank, P, S, device=None):
        return torch.tensor(_cached_block_positions(self, rank, P), dtype=torch.long, device=device)

    def _segments(self, rank, P, S_local):
        raise ValueError("seqpar: a Blocks layout has no equal shards (use its positions)")


@lru_cache(maxsize=512)
def _cached_block_positions(layout: Blocks, rank: int, P: int) -> tuple[int, ...]:
    out, at = [], 0
    for start, stop, times in layout.blocks:
        n = stop - start
        offsets = layout_of(layout.base).part_rows(rank, P, layout.S, start, stop)[1] if P > 1 else tuple(range(n))
        for t in range(times):
            out.extend(at + t * n + o for o in offsets)
        at += times * n
    return tuple(out)


_ZIGZAG = Zigzag("zigzag")
_cached_segments = lru_cache(maxsize=None)(lambda layout, rank, P, S_local: layout._segments(rank, P, S_local))


def _real_tensors():
    """Positions are plain integers of the layout: computed on real tensors even while a fake
    mode is active (Dynamo tracing a frame that meets a shard), where reading a value would be
    a data-dependent graph break."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    return unset_fake_temporarily()


@lru_cache(maxsize=512)
def _cached_increasing(layout: Layout, rank: int, P: int, S: int) -> bool:
    with _real_tensors():
        return bool((layout.positions(rank, P, S).diff() > 0).all())


@lru_cache(maxsize=512)
def _cached_part_rows(layout: Layout, rank: int, P: int, S: int, start: int, stop: int):
    with _real_tensors():
        mine = layout.positions(rank, P, S).tolist() if P > 1 or not layout.balanced else list(range(S))
    hits = [(i, p - start) for i, p in enumerate(mine) if start <= p < stop]
    return tuple(i for i, _ in hits), tuple(o for _, o in hits)


def layout_of(schedule) -> Layout:
    """The ``Layout`` a schedule name denotes (a ``Layout`` is returned as it is).

    ``auto`` and a bare ``hybrid`` name no layout yet (the compiler picks one, the degree
    completes the other) and are refused, like any other name, with the allowed values."""
    if isinstance(schedule, Layout):
        return schedule
    # a plain dict, not lru_cache: Dynamo traces this where a compiled function checks its layout
    layout = _PARSED.get(schedule) if isinstance(schedule, str) else None
    if layout is None:
        layout = _PARSED[schedule] = _parse(schedule)
    return layout


_PARSED: dict[str, Layout] = {}


def _parse(name) -> Layout:
    if name in ("ring", "distflash", "ulysses"):
        return Contiguous(name)
    if name == "zigzag":
        return _ZIGZAG
    if name == "striped":
        return Striped(name)
    if isinstance(name, str) and name.startswith("hybrid:"):
        degree = name.partition(":")[2]
        if degree.isdigit() and int(degree) >= 1:
            return Hybrid(name, int(degree))
    raise ValueError(f"unknown schedule {name!r}; allowed: {ALLOWED}")
