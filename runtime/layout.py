"""Which global sequence positions each rank holds, per schedule: the one place layout math lives.

Both the ring (global positions of the local query and key rows) and the graph passes
(slicing replicated tensors into a rank's part) use these functions, so they cannot disagree.

Layouts (S global length, P ranks, chunks of S/(2P) tokens; DESIGN §1):
  ring, distflash  rank r holds [r·S/P, (r+1)·S/P)
  zigzag           rank r holds chunk r followed by chunk 2P−1−r
  striped          rank r holds r, r+P, r+2P, …

A rank's tokens are a short list of affine ``Segment``s (start, count, stride), which is what
block masks need: global position of local row i of a segment = start + i·stride.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["SCHEDULES", "Segment", "local_segments", "local_positions", "check_sequence_length",
           "required_multiple"]

SCHEDULES = ("ring", "zigzag", "striped", "distflash")


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
    return 2 * P if schedule == "zigzag" and P > 1 else P


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")


def check_sequence_length(S: int, schedule: str, P: int, *, what: str = "sequence length") -> None:
    """A clear error when ``S`` cannot be split as ``schedule`` needs on ``P`` ranks."""
    m = required_multiple(schedule, P)
    if S % m:
        why = " (each rank holds two chunks)" if schedule == "zigzag" else ""
        raise ValueError(f"{what} {S} cannot be split by schedule {schedule!r} over {P} ranks: it must be "
                         f"a multiple of {m}{why}; pad the sequence to a multiple of {m}")


@lru_cache(maxsize=None)
def local_segments(schedule: str, rank: int, P: int, S_local: int) -> tuple[Segment, ...]:
    """The affine segments of rank ``rank``'s ``S_local`` rows, in local order."""
    _check_schedule(schedule)
    if P == 1:
        return (Segment(0, 0, S_local),)
    if schedule in ("ring", "distflash"):
        return (Segment(0, rank * S_local, S_local),)
    if schedule == "striped":
        return (Segment(0, rank, S_local, P),)
    if S_local % 2:
        raise ValueError(f"zigzag needs an even local length (global length a multiple of {2 * P}); "
                         f"got S_local={S_local}")
    c = S_local // 2
    return (Segment(0, rank * c, c), Segment(c, (2 * P - 1 - rank) * c, c))


def local_positions(schedule: str, rank: int, P: int, S: int, device=None) -> torch.Tensor:
    """Global positions [S/P] of rank ``rank``'s tokens, in local order (int64)."""
    check_sequence_length(S, schedule, P)
    parts = [seg.start + torch.arange(seg.count, device=device) * seg.stride
             for seg in local_segments(schedule, rank, P, S // P)]
    return torch.cat(parts)
