"""Point-to-point traffic of the ring and the agreement check, on ``torch.distributed``.

All ring transfers are posted with ``batch_isend_irecv`` and waited on later, so the next KV
block is in flight while the current one is computed (docs/architecture.md). Sends and receives carry a
tag that names what they are and at which step; each side posts its operations for a pair of
ranks in the same order (what NCCL, which ignores tags, relies on).

Wire layout: a 4-D [B, H, S, D] tensor travels as its [B, S, H, D] memory (the layout the
projections produce and ATen's flash kernel returns), so the ring neither copies its inputs
into [B, H, S, D] order nor its results back; every 4-D buffer posted here must be laid out so
(``to_wire_layout`` / ``empty_wire``), and both ends of a message agree by construction.
Other tensors travel contiguous.

Host staging: gloo cannot move CUDA tensors between processes that share one GPU, so without
NCCL the ring's CUDA tensors travel through pinned host buffers (copied out before a send is
posted, copied in when a receive is waited on). NCCL stays the fast path; this one lets 2–4
processes check the multi-rank GPU path on a single GPU.

A failure on the wire (a peer that died or stopped calling the op, a timeout) is re-raised as
``RingCommError`` saying which rank waited for what, at which step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .control import control_all_gather
from .stats import record

__all__ = ["RingComm", "RingCommError", "Transfer", "check_agreement", "empty_wire", "empty_wire_like",
           "in_wire_layout", "set_host_staging", "to_wire_layout"]


class RingCommError(RuntimeError):
    """A ring transfer failed: a peer died, raised, or stopped calling ring attention."""


# Tag = step * _TAG_STRIDE + kind: distinct for every kind of message at every step.
_TAG_STRIDE = 32
TAGS = {name: i for i, name in enumerate(
    ["k", "v", "doc", "q", "q_doc", "dout", "out", "lse", "dlse", "res_out", "res_lse",
     "acc_dk", "acc_dv", "home_dk", "home_dv", "res_dq", "kvalid"])}


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
    # host staging: (device tensor, host buffer) pairs to copy in after the receives land, and
    # the host copies of sends, kept alive until their sends complete
    copy_back: list = field(default_factory=list)
    keep: list = field(default_factory=list)

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
        for dst, host in self.copy_back:
            dst.copy_(host)
        self.works, self.copy_back, self.keep = [], [], []


# Host staging of ring transfers (``None``: automatic; tests force it on CPU tensors).
_host_staging: bool | None = None


def set_host_staging(mode: bool | None) -> None:
    """Force staging ring transfers through host buffers on (``True``), off, or back to
    automatic (``None``: CUDA tensors over a group without NCCL). For tests and benchmarks."""
    global _host_staging
    _host_staging = mode


def _needs_host_staging(group: dist.ProcessGroup, device: torch.device) -> bool:
    """gloo cannot send CUDA tensors between processes that share a GPU (``writev … Bad
    address``): without NCCL, CUDA tensors travel through pinned host memory."""
    if _host_staging is not None:
        return _host_staging
    return device.type == "cuda" and "nccl" not in str(dist.get_backend(group))


def _host_buffer(x: torch.Tensor) -> torch.Tensor:
    """A host buffer of ``x``'s shape and dtype: pinned when ``x`` is on a GPU (the copy is then a
    DMA, and torch's caching host allocator reuses the buffers across steps)."""
    return torch.empty(x.shape, dtype=x.dtype, pin_memory=x.device.type == "cuda")


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
        pending = Pending(self, [], what)
        staged = _needs_host_staging(self.group, transfers[0].tensor.device)
        for tr in transfers:
            op = dist.isend if tr.send else dist.irecv
            buf = _on_wire(tr.tensor)
            nbytes = tr.tensor.numel() * tr.tensor.element_size()
            if staged:
                host = _host_buffer(buf)
                if tr.send:
                    host.copy_(buf)                  # blocking: the send reads finished data
                    pending.keep.append(host)
                else:
                    pending.copy_back.append((buf, host))
                buf = host
                record(host_staged_bytes=nbytes)
            ops.append(dist.P2POp(op, buf, group=self.group, tag=tr.tag, group_peer=tr.peer))
            record(**{"bytes_sent" if tr.send else "bytes_received": nbytes})
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as err:
            raise RingCommError(
                f"ring attention: rank {self.rank} of {self.size} could not start {what}: {err}. A peer rank has "
                f"probably died, raised, or stopped calling ring_attention; look for the first error in the other "
                f"ranks' logs") from err
        pending.works = works
        return pending


def check_agreement(group: dist.ProcessGroup, fields: dict[str, int], what: str) -> None:
    """Raise on every rank if the ranks of ``group`` passed different ``fields``.

    One all-gather of a few integers; called once per new configuration, since ranks that
    disagree on shapes, schedule or mask flags would otherwise hang or compute garbage.
    """
    # on the group's device: NCCL serves no CPU tensors
    size = dist.get_world_size(group)
    table = control_all_gather(torch.tensor(list(fields.values()), dtype=torch.int64), group)
    differ = (table != table[0]).any(dim=0)
    if bool(differ.any()):
        names = [name for name, d in zip(fields, differ.tolist()) if d]
        detail = "; ".join(f"{n}: " + ", ".join(f"rank {r}={table[r, list(fields).index(n)].item()}"
                                                for r in range(size)) for n in names)
        raise ValueError(f"{what}: the ranks of the group disagree on {', '.join(names)} ({detail}). "
                         f"Every rank must call it with the same shapes, dtype and options")
