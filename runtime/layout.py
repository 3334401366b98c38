"""Which global sequence positions each rank holds, per schedule: the one place layout math lives.

Both the ring (global positions of the local query and key rows) and the graph passes
(slicing replicated tensors into a rank's part) use these functions, so they cannot disagree.

Layouts (S global length, P ranks, chunks of S/(2P) tokens; docs/architecture.md):
  ring, distflash  rank r holds [r·S/P, (r+1)·S/P)
  zigzag           rank r holds chunk r followed by chunk 2P−1−r
  striped          rank r holds r, r+P, r+2P, …
  ulysses          as ring (all-to-all attention, ``ulysses.py``)
  hybrid:u         G = P/u groups of u consecutive ranks; group g holds zigzag(G) chunks g and
                   2G−1−g (chunks of S/(2G)), split contiguously over its u ranks, so the
                   all-to-all inside a group hands each rank exactly ring rank g's zigzag shard

A rank's tokens are a short list of affine ``Segment``s (start, count, stride), which is what
block masks need: global position of local row i of a segment = start + i·stride.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["SCHEDULES", "A2A_SCHEDULES", "Segment", "local_segments", "local_positions", "check_sequence_length",
           "required_multiple", "split_schedule"]

SCHEDULES = ("ring", "zigzag", "striped", "distflash")
# layouts of the all-to-all attention; the hybrid's name carries its Ulysses degree u
A2A_SCHEDULES = ("ulysses", "hybrid")


def split_schedule(schedule: str) -> tuple[str, int | None]:
    """``"hybrid:2"`` → ``("hybrid", 2)``; any other layout name → ``(name, None)``."""
    name, _, degree = schedule.partition(":")
    if name == "hybrid" and degree.isdigit() and int(degree) >= 1:
        return name, int(degree)
    return schedule, None


@dataclass(frozen=True)
class Segment:
    """Local rows ``[offset, offset + count)`` hold global positions ``start + i * stride``."""

    offset: int
    start: int
    count: int
    stride: int = 1


def required_multiple(schedule: str, P: int) -> int:
    """The global sequence length must be a multiple of this."""
    _check_schedule(schedule)
    name, u = split_schedule(schedule)
    if name == "hybrid":
        G = max(P // u, 1)
        return P if G == 1 else math.lcm(P, 2 * G)
    return 2 * P if schedule == "zigzag" and P > 1 else P


def _check_schedule(schedule: str) -> None:
    name, u = split_schedule(schedule)
    if name not in SCHEDULES and name != "ulysses" and u is None:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES + A2A_SCHEDULES[:1])}, "
                         f"hybrid:u (u = the Ulysses degree)")


def check_sequence_length(S: int, schedule: str, P: int, *, what: str = "sequence length") -> None:
    """A clear error when ``S`` cannot be split as ``schedule`` needs on ``P`` ranks."""
    m = required_multiple(schedule, P)
    if S % m:
        why = " (each rank holds two chunks)" if schedule == "zigzag" else ""
        raise ValueError(f"{what} {S} cannot be split by schedule {schedule!r} over {P} ranks: it must be "
                         f"a multiple of {m}{why}; pad the sequence to a multiple of {m}")


def local_segments(schedule: str, rank: int, P: int, S_local: int) -> tuple[Segment, ...]:
    """The affine segments of rank ``rank``'s ``S_local`` rows, in local order (cached for
    concrete lengths; a symbolic one, met while Dynamo traces a frame at a dynamic length, cannot
    be hashed and is computed each time)."""
    if isinstance(S_local, torch.SymInt):
        return _local_segments(schedule, rank, P, S_local)
    return _cached_segments(schedule, rank, P, S_local)


def _local_segments(schedule: str, rank: int, P: int, S_local: int) -> tuple[Segment, ...]:
    _check_schedule(schedule)
    if P == 1:
        return (Segment(0, 0, S_local),)
    if schedule in ("ring", "distflash", "ulysses"):
        return (Segment(0, rank * S_local, S_local),)
    if schedule.startswith("hybrid:"):
        return _hybrid_segments(split_schedule(schedule)[1], rank, P, S_local)
    if schedule == "striped":
        return (Segment(0, rank, S_local, P),)
    if S_local % 2:
        raise ValueError(f"zigzag needs an even local length (global length a multiple of {2 * P}); "
                         f"got S_local={S_local}")
    c = S_local // 2
    return (Segment(0, rank * c, c), Segment(c, (2 * P - 1 - rank) * c, c))


_cached_segments = lru_cache(maxsize=None)(_local_segments)


def _hybrid_segments(u: int, rank: int, P: int, S_local: int) -> tuple[Segment, ...]:
    """Rank ``rank`` = g·u + j holds rows [j·S_local, (j+1)·S_local) of ring rank g's zigzag(G)
    shard (``S_local·u`` rows): the pieces of its two chunks that fall in that range."""
    if P % u:
        raise ValueError(f"hybrid: the Ulysses degree {u} must divide the group size {P}")
    g, j = divmod(rank, u)
    ring_segs = local_segments("zigzag", g, P // u, S_local * u)
    lo, hi, out = j * S_local, (j + 1) * S_local, []
    for seg in ring_segs:
        a, b = max(lo, seg.offset), min(hi, seg.offset + seg.count)
        if a < b:
            out.append(Segment(a - lo, seg.start + (a - seg.offset) * seg.stride, b - a, seg.stride))
    return tuple(out)


def local_positions(schedule: str, rank: int, P: int, S: int, device=None) -> torch.Tensor:
    """Global positions [S/P] of rank ``rank``'s tokens, in local order (int64)."""
    check_sequence_length(S, schedule, P)
    parts = [seg.start + torch.arange(seg.count, device=device) * seg.stride
             for seg in local_segments(schedule, rank, P, S // P)]
    return torch.cat(parts)
