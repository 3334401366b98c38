"""The layout functions by schedule name, for callers that hold the name (graphs and custom ops
carry layouts as strings): each parses the name once through ``sharding/layout.py``, where the
layouts live as objects (``layout_of``)."""
from __future__ import annotations

import torch

from .sharding.layout import A2A_SCHEDULES, SCHEDULES, Layout, Segment, layout_of

__all__ = ["SCHEDULES", "A2A_SCHEDULES", "Segment", "Layout", "layout_of", "local_segments", "local_positions",
           "check_sequence_length", "required_multiple"]


def required_multiple(schedule, P: int) -> int:
    """The global sequence length must be a multiple of this."""
    return layout_of(schedule).required_multiple(P)


def check_sequence_length(S: int, schedule, P: int, *, what: str = "sequence length") -> None:
    """A clear error when ``S`` cannot be split as ``schedule`` needs on ``P`` ranks."""
    layout_of(schedule).check_length(S, P, what=what)


def local_segments(schedule, rank: int, P: int, S_local: int) -> tuple[Segment, ...]:
    """The affine segments of rank ``rank``'s ``S_local`` rows, in local order."""
    return layout_of(schedule).segments(rank, P, S_local)


def local_positions(schedule, rank: int, P: int, S: int, device=None) -> torch.Tensor:
    """Global positions [S/P] of rank ``rank``'s tokens, in local order (int64)."""
    return layout_of(schedule).positions(rank, P, S, device=device)
