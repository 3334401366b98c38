"""Counters of this rank's attention work: ``with stats() as s: ...`` (docs/architecture.md).

Counting is cheap (a few integer additions per ring step) and only happens while a block is
open, so the ring pays nothing outside one. Nested blocks all count.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import asdict, dataclass, field
from typing import Iterator

__all__ = ["Stats", "stats", "record", "record_kernel", "counting", "not_counted"]


@dataclass(eq=False)
class Stats:
    """This rank's work inside one ``stats()`` block.

    attention_flops counts 2·B·Hq·(D + Dv) per (query, key) pair a block kernel computed (4·B·Hq·D
    when v's head dim equals q's), in the forward and in the backward alike (so a ratio between
    ranks is a ratio of kernel work). bytes_sent / bytes_received count ring traffic (K/V blocks
    and their key metadata, queries and partial results moved for load balancing, dK/dV
    accumulators); control_bytes counts the agreement checks. a2a_bytes_sent / a2a_bytes_received
    count the all-to-all attention's traffic (``ulysses.py``: heads ↔ sequence of q, k, v, out,
    lse and gradients, and its document ids), kept apart from the ring's so a hybrid's two kinds
    of link can be told apart. host_staged_bytes counts ring and all-to-all traffic that went
    through host buffers (CUDA tensors over gloo, ``comm.py``). kernel_calls counts block-kernel
    calls by concrete kernel and direction, e.g. ``{"cudnn.forward": 4, "cudnn.backward": 4,
    "flash.forward": 2}``
    (on CUDA, ``auto`` picks a kernel per block).
    """

    attention_forward_calls: int = 0
    attention_backward_calls: int = 0
    block_kernel_calls: int = 0
    attention_flops: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    a2a_bytes_sent: int = 0
    a2a_bytes_received: int = 0
    control_bytes: int = 0
    host_staged_bytes: int = 0
    comm_wait_seconds: float = 0.0
    kernel_calls: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


# Process-wide, not thread-local: the autograd engine may run the backward on a device thread.
_open: list[Stats] = []
_lock = threading.Lock()


@contextlib.contextmanager
def stats() -> Iterator[Stats]:
    """Count this rank's attention work inside the block."""
    s = Stats()
    with _lock:
        _open.append(s)
    try:
        yield s
    finally:
        with _lock:
            _open.remove(s)


@contextlib.contextmanager
def not_counted() -> Iterator[None]:
    """Work seqpar does for itself (timing the kernels to calibrate the cost model at the first
    ``schedule="auto"`` compile) is not the user's: open ``stats()`` blocks do not count it."""
    with _lock:
        hidden = list(_open)
        _open.clear()
    try:
        yield
    finally:
        with _lock:
            _open[:0] = hidden


def counting() -> bool:
    """True while a ``stats()`` block is open: lets callers skip work done only to count."""
    return bool(_open)


def record(**increments) -> None:
    """Add to every open ``Stats`` (no-op when none is open)."""
    if not _open:
        return
    with _lock:
        for s in _open:
            for name, value in increments.items():
                setattr(s, name, getattr(s, name) + value)


def record_kernel(kernel: str, direction: str) -> None:
    """Count one block-kernel call of ``kernel`` (``aten``, ``triton``, ``math``, ``cudnn``,
    ``flash``) in ``direction`` (``forward`` or ``backward``) in every open ``Stats``."""
    if not _open:
        return
    key = f"{kernel}.{direction}"
    with _lock:
        for s in _open:
            s.kernel_calls[key] = s.kernel_calls.get(key, 0) + 1


# The kernels layer sits below this one (docs/architecture.md) and cannot import it: it calls a hook.
from seqpar_compiler.kernels import set_kernel_call_hook  # noqa: E402

set_kernel_call_hook(record_kernel)
