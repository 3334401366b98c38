"""Point-to-point traffic of the ring and the agreement check, on ``torch.distributed``.

All ring transfers are posted with ``batch_isend_irecv`` and waited on later, so the next KV
block is in flight while the current one is computed (DESIGN §3). Sends and receives carry a
tag that names what they are and at which step; each side posts its operations for a pair of
ranks in the same order (what NCCL, which ignores tags, relies on).

Wire layout: a 4-D [B, H, S, D] tensor travels as its [B, S, H, D] memory (the layout the
projections produce and ATen's flash kernel returns), so the ring neither copies its inputs
into [B, H, S, D] order nor its results back; every 4-D buffer posted here must be laid out so
(``to_wire_layout`` / ``empty_wire``), and both ends of a message agree by construction.
Other tensors travel contiguous.

A failure on the wire (a peer that died or stopped calling the op, a timeout) is re-raised as
``RingCommError`` saying which rank waited for what, at which step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .stats import record

__all__ = ["RingComm", "RingCommError", "Transfer", "check_agreement", "empty_wire", "empty_wire_like",
           "in_wire_layout", "to_wire_layout"]


class RingCommError(RuntimeError):
    """A ring transfer failed: a peer died, raised, or stopped calling ring attention."""


# Tag = step * _TAG_STRIDE + kind: distinct for every kind of message at every step.
_TAG_STRIDE = 32
TAGS = {name: i for i, name in enumerate(
    ["k", "v", "doc", "q", "q_doc", "dout", "out", "lse", "dlse", "res_out", "res_lse",
     "acc_dk", "acc_dv", "home_dk", "home_dv", "res_dq"])}


def in_wire_layout(x: torch.Tensor) -> bool:
    """True if ``x`` can be posted as is: a 4-D [B, H, S, D] tensor whose memory is a dense
    [B, S, H, D]; any other tensor contiguous."""
    return x.transpose(1, 2).is_contiguous() if x.dim() == 4 else x.is_contiguous()


def to_wire_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if it is in the wire layout, else a copy that is."""
    if in_wire_layout(x):
        return x
    if x.dim() == 4:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.contiguous()


def empty_wire(shape, dtype: torch.dtype, device: torch.device, *, zero: bool = False) -> torch.Tensor:
    """An uninitialised (or zero) 4-D [B, H, S, D] buffer in the wire layout."""
    B, H, S, D = shape
    make = torch.zeros if zero else torch.empty
    return make(B, S, H, D, dtype=dtype, device=device).transpose(1, 2)


def empty_wire_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer of ``x``'s shape in the wire layout, to receive ``x``'s kind of message."""
    if x.dim() == 4:
        return empty_wire(x.shape, x.dtype, x.device)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _on_wire(x: torch.Tensor) -> torch.Tensor:
    """The contiguous view of a wire-layout tensor that P2P sends or receives into."""
    if not in_wire_layout(x):
        raise RuntimeError(f"internal error: a ring buffer of shape {tuple(x.shape)} and strides {x.stride()} "
                           f"is not in the wire layout; the two ends of the message could disagree")
    return x.transpose(1, 2) if x.dim() == 4 else x


@dataclass
class Transfer:
    """One send or receive of ``tensor`` to/from group rank ``peer``."""

    send: bool
    tensor: torch.Tensor
    peer: int
    kind: str
    step: int

    @property
    def tag(self) -> int:
        return self.step * _TAG_STRIDE + TAGS[self.kind]


@dataclass
class Pending:
    """Transfers in flight; ``wait()`` blocks until all are done."""

    comm: "RingComm"
    works: list = field(default_factory=list)
    what: str = ""

    def wait(self) -> None:
        if not self.works:
            return
        start = time.perf_counter()
        try:
            for w in self.works:
                w.wait()
        except RuntimeError as err:
            raise RingCommError(
                f"ring attention: rank {self.comm.rank} of {self.comm.size} failed waiting for {self.what}: "
                f"{err}. A peer rank has probably died, raised, or stopped calling ring_attention; "
                f"look for the first error in the other ranks' logs") from err
        finally:
            record(comm_wait_seconds=time.perf_counter() - start)
        self.works = []


class RingComm:
    """The P2P layer of one process group (``group=None`` with size 1 means no communication)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        if group is None:
            self.rank, self.size = 0, 1
        else:
            self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.size

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.size

    def post(self, transfers: list[Transfer], what: str) -> Pending:
        """Start ``transfers`` (in list order) and return the handle to wait on."""
        if not transfers:
            return Pending(self, [], what)
        ops = []
        for tr in transfers:
            op = dist.isend if tr.send else dist.irecv
            ops.append(dist.P2POp(op, _on_wire(tr.tensor), group=self.group, tag=tr.tag, group_peer=tr.peer))
            nbytes = tr.tensor.numel() * tr.tensor.element_size()
            record(**{"bytes_sent" if tr.send else "bytes_received": nbytes})
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as err:
            raise RingCommError(
                f"ring attention: rank {self.rank} of {self.size} could not start {what}: {err}. A peer rank has "
                f"probably died, raised, or stopped calling ring_attention; look for the first error in the other "
                f"ranks' logs") from err
        return Pending(self, works, what)


def check_agreement(group: dist.ProcessGroup, fields: dict[str, int], what: str) -> None:
    """Raise on every rank if the ranks of ``group`` passed different ``fields``.

    One all-gather of a few integers; called once per new configuration, since ranks that
    disagree on shapes, schedule or mask flags would otherwise hang or compute garbage.
    """
    values = torch.tensor(list(fields.values()), dtype=torch.int64)
    size = dist.get_world_size(group)
    gathered = [torch.empty_like(values) for _ in range(size)]
    dist.all_gather(gathered, values, group=group)
    record(control_bytes=values.numel() * 8 * (size - 1) * 2)
    table = torch.stack(gathered)
    differ = (table != table[0]).any(dim=0)
    if bool(differ.any()):
        names = [name for name, d in zip(fields, differ.tolist()) if d]
        detail = "; ".join(f"{n}: " + ", ".join(f"rank {r}={table[r, list(fields).index(n)].item()}"
                                                for r in range(size)) for n in names)
        raise ValueError(f"{what}: the ranks of the group disagree on {', '.join(names)} ({detail}). "
                         f"Every rank must call it with the same shapes, dtype and options")
