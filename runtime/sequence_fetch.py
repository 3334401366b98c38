"""Rows of other ranks at fixed global positions: the halo of a convolution over time, a roll, a flip.

``seqpar::sequence_fetch(x, dim, kind, schedule, group_name)`` returns, for this rank, the rows
of the global sequence at the positions ``kind`` names (a static map of the layout, the same on
every rank): rows this rank holds are copied, rows other ranks hold arrive by one point-to-point
message per pair of ranks that exchange anything, and a position outside the sequence is zero.
Its backward (``seqpar::sequence_fetch_backward``) is the mirror: each fetched row's gradient goes
back to its owner and is added where the row came from.

Kinds (S global length; a rank's tokens are the layout's segments, ``layout.local_segments``):
  ``halo:L:R:C``  per segment ``[start, end)``: the L positions before it, then the R after it
                 (``C`` = 1: around the sequence circularly, else zero outside); what a
                 convolution over time needs beside its own tokens. Output rows nseg·(L+R).
  ``shift:K:C``   per local token at global position g: position g−K (a roll by K when ``C`` = 1,
                 a shift with zero fill otherwise). Output rows S/P; only the K boundary rows of
                 each segment cross ranks.
  ``flip``        per local token at g: position S−1−g. On zigzag a rank holds its own mirror
                 image, so nothing crosses ranks.

Why one op with a static map rather than a ring step: the neighbour of a segment is wherever the
layout put the adjacent chunk (zigzag's second chunk borrows from the next rank, not the previous),
and the map makes contiguous and zigzag the same code, with only the boundary rows on the wire.

Shape legend: x ``[..., S/P, ...]`` (sequence at ``dim``), output ``[..., n, ...]`` with n the
kind's row count.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import local_segments
from .ring_op import resolve_group

__all__ = ["sequence_fetch_op", "sequence_fetch_backward_op", "FetchMap", "fetch_map", "needed_positions",
           "halo_kind", "shift_kind", "fetched_rows_from_others"]


def halo_kind(left: int, right: int, circular: bool = False) -> str:
    return f"halo:{left}:{right}:{int(circular)}"


def shift_kind(shift: int, circular: bool = True) -> str:
    return f"shift:{shift}:{int(circular)}"


def needed_positions(kind: str, schedule: str, rank: int, P: int, S: int) -> list[int]:
    """The global positions (−1: zero) whose rows rank ``rank`` fetches, in output order."""
    name, *params = kind.split(":")
    if name == "flip":
        return [S - 1 - g for g in _positions(schedule, rank, P, S)]
    if name == "shift":
        k, circular = int(params[0]), params[1] == "1"
        return [_wrap(g - k, S, circular) for g in _positions(schedule, rank, P, S)]
    if name == "halo":
        left, right, circular = int(params[0]), int(params[1]), params[2] == "1"
        out = []
        for seg in local_segments(schedule, rank, P, S // P):
            if seg.stride != 1:
                raise ValueError(f"a halo needs runs of consecutive positions; {schedule!r} holds strided ones")
            end = seg.start + seg.count
            out += [_wrap(g, S, circular) for g in range(seg.start - left, seg.start)]
            out += [_wrap(g, S, circular) for g in range(end, end + right)]
        return out
    raise ValueError(f"unknown fetch kind {kind!r}")


def _positions(schedule: str, rank: int, P: int, S: int) -> list[int]:
    """Rank ``rank``'s global positions in local order, as Python ints (no tensor: this runs in
    the op's fake implementation too, where a tensor would be fake)."""
    return [seg.start + i * seg.stride for seg in local_segments(schedule, rank, P, S // P) for i in range(seg.count)]


def _wrap(g: int, S: int, circular: bool) -> int:
    if circular:
        return g % S
    return g if 0 <= g < S else -1


@dataclass(frozen=True)
class FetchMap:
    """What one rank does for one fetch: ``local`` (output slots, own rows) copied; per peer,
    ``recv[peer]`` the output slots its rows fill and ``send[peer]`` own rows it needs (in the
    peer's slot order); ``rows`` the output's row count. Index tuples, made tensors on use."""

    rows: int
    local: tuple
    recv: dict
    send: dict


@lru_cache(maxsize=256)
def fetch_map(kind: str, schedule: str, rank: int, P: int, S: int) -> FetchMap:
    """Rank ``rank``'s part of the exchange ``kind`` (every rank computes every rank's needs, so
    the sends and receives pair up without a handshake)."""
    owner, row = [0] * S, [0] * S
    for r in range(P):
        for i, g in enumerate(_positions(schedule, r, P, S)):
            owner[g], row[g] = r, i
    mine = needed_positions(kind, schedule, rank, P, S)
    local = ([], [])
    recv: dict[int, tuple[list, list]] = {}
    for slot, g in enumerate(mine):
        if g < 0:
            continue
        if owner[g] == rank:
            local[0].append(slot)
            local[1].append(row[g])
        else:
            recv.setdefault(owner[g], ([], []))[0].append(slot)
    send: dict[int, list] = {}
    for peer in range(P):
        if peer == rank:
            continue
        rows = [row[g] for g in needed_positions(kind, schedule, peer, P, S) if g >= 0 and owner[g] == rank]
        if rows:
            send[peer] = tuple(rows)
    return FetchMap(len(mine), (tuple(local[0]), tuple(local[1])),
                    {p: tuple(v[0]) for p, v in recv.items()}, send)


def fetched_rows_from_others(kind: str, schedule: str, rank: int, P: int, S: int) -> int:
    """How many rows rank ``rank`` receives from other ranks for one fetch (the cost model's
    halo)."""
    return sum(len(v) for v in fetch_map(kind, schedule, rank, P, S).recv.values())


# gloo matches messages by tag: one far above the ring's (step · stride + kind, ``comm.TAGS``)
_TAG = 1 << 24


def _rank_and_size(group_name: str):
    group = resolve_group(group_name)
    if group is None:
        return 0, 1, None
    return dist.get_rank(group), dist.get_world_size(group), group


@dataclass(frozen=True)
class _MapIndices:
    local_slots: Tensor
    local_rows: Tensor
    recv: dict          # peer -> output slots
    send: dict          # peer -> own rows


@lru_cache(maxsize=256)
def _indices(kind: str, schedule: str, rank: int, P: int, S: int, device: torch.device) -> _MapIndices:
    """``fetch_map`` as index tensors on ``device``, made once (a roll's map is S/P long: not
    worth rebuilding from Python every call)."""
    m = fetch_map(kind, schedule, rank, P, S)

    def idx(values):
        return torch.tensor(values, dtype=torch.long, device=device)
    return _MapIndices(idx(m.local[0]), idx(m.local[1]), {p: idx(v) for p, v in m.recv.items()},
                       {p: idx(v) for p, v in m.send.items()})


def _exchange(group, sends: dict, recv_shapes: dict) -> dict:
    """Point-to-point: ``sends[peer]`` goes to ``peer``; returns the tensors received, per peer."""
    received = {peer: torch.empty(shape, dtype=dtype, device=device)
                for peer, (shape, dtype, device) in recv_shapes.items()}
    ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, peer), group, _TAG) for peer, t in sends.items()]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer), group, _TAG) for peer, t in received.items()]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return received


def _sized(x: Tensor, dim: int, n: int) -> list:
    shape = list(x.shape)
    shape[dim] = n
    return shape


@torch.library.custom_op("seqpar::sequence_fetch", mutates_args=())
def sequence_fetch_op(x: Tensor, dim: int, kind: str, schedule: str, group_name: str) -> Tensor:
    rank, P, group = _rank_and_size(group_name)
    dim %= x.dim()
    m = fetch_map(kind, schedule, rank, P, x.shape[dim] * P)
    ix = _indices(kind, schedule, rank, P, x.shape[dim] * P, x.device)
    out = x.new_zeros(_sized(x, dim, m.rows))
    if m.local[0]:
        out.index_copy_(dim, ix.local_slots, x.index_select(dim, ix.local_rows))
    sends = {peer: x.index_select(dim, rows).contiguous() for peer, rows in ix.send.items()}
    shapes = {peer: (_sized(x, dim, len(slots)), x.dtype, x.device) for peer, slots in m.recv.items()}
    for peer, got in _exchange(group, sends, shapes).items():
        out.index_copy_(dim, ix.recv[peer], got)
    return out


@sequence_fetch_op.register_fake
def _(x, dim, kind, schedule, group_name):
    rank, P, _ = _rank_and_size(group_name)
    dim %= x.dim()
    return x.new_empty(_sized(x, dim, len(needed_positions(kind, schedule, rank, P, x.shape[dim] * P))))


@torch.library.custom_op("seqpar::sequence_fetch_backward", mutates_args=())
def sequence_fetch_backward_op(grad: Tensor, dim: int, kind: str, schedule: str, group_name: str,
                               local_rows: int) -> Tensor:
    rank, P, group = _rank_and_size(group_name)
    dim %= grad.dim()
    m = fetch_map(kind, schedule, rank, P, local_rows * P)
    ix = _indices(kind, schedule, rank, P, local_rows * P, grad.device)
    out = grad.new_zeros(_sized(grad, dim, local_rows))
    if m.local[0]:
        out.index_add_(dim, ix.local_rows, grad.index_select(dim, ix.local_slots))
    # the mirror of the forward: gradients of rows fetched from a peer go back to it
    sends = {peer: grad.index_select(dim, slots).contiguous() for peer, slots in ix.recv.items()}
    shapes = {peer: (_sized(grad, dim, len(rows)), grad.dtype, grad.device) for peer, rows in m.send.items()}
    for peer, got in _exchange(group, sends, shapes).items():
        out.index_add_(dim, ix.send[peer], got)
    return out


@sequence_fetch_backward_op.register_fake
def _(grad, dim, kind, schedule, group_name, local_rows):
    return grad.new_empty(_sized(grad, dim % grad.dim(), local_rows))


def _setup(ctx, inputs, output):
    x, ctx.dim, ctx.kind, ctx.schedule, ctx.group_name = inputs
    ctx.local_rows = x.shape[ctx.dim % x.dim()]


def _backward(ctx, grad):
    return (sequence_fetch_backward_op(grad.contiguous(), ctx.dim, ctx.kind, ctx.schedule, ctx.group_name,
                                       ctx.local_rows), None, None, None, None)


sequence_fetch_op.register_autograd(_backward, setup_context=_setup)
