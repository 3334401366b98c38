"""All-to-all (Ulysses) attention and the Ulysses × ring hybrid: the algorithm.

Ulysses (DeepSpeed-Ulysses): an all-to-all over u ranks turns sequence shards of all heads into
the whole (group's) sequence for 1/u of the heads, one local attention runs there, and the
inverse all-to-all turns the result back. Each rank's work is the same whatever the mask (every
rank attends over the same sequence, with its own heads), and its traffic per rank shrinks as u
grows: it sends (u−1)/u of its q, k, v and out, where a ring sends (P−1)/P of the KV.

Hybrid (USP / TransformerEngine ``a2a+p2p``): the P ranks form G = P/u groups of u consecutive
ranks (one node). The all-to-all runs inside a group; what it hands each rank is ring rank g's
zigzag(G) shard of H/u heads (the ``hybrid:u`` layout, ``layout.py``), so the ring across the G
groups — ranks with the same index j inside their group — is the zigzag ring, unchanged
(``ring.py``). ``ulysses`` is the hybrid with u = P (G = 1: the "ring" is one local block).

KV heads: sent at Hkv heads when u divides Hkv; otherwise each KV head is replicated to
R = lcm(Hkv, u) heads first (R divides Hq, since u and Hkv both do), and the backward sums the
replicas' gradients. Head j·Hq/u + i of the queries meets KV head (j·Hq/u + i) // (Hq/R): the GQA
grouping of the original model.

Shape legend (u = Ulysses degree, S_l = S/P local rows, S_g = u·S_l the group's rows):
  q [B, Hq, S_l, D]  k [B, Hkv, S_l, D]  v [B, Hkv, S_l, Dv]  doc [B, S_l]  slopes [Hq]
  after the all-to-all: q_g [B, Hq/u, S_g, D], k_g/v_g [B, R/u, S_g, D|Dv], doc_g [B, S_g]
  out [B, Hq, S_l, Dv] (wire layout, as the ring's), lse [B, Hq, S_l] fp32 (fp64 for fp64)

What the backward needs is what the forward had on the other side of its all-to-all: the
forward also returns its head-sharded q_g, k_g, v_g, out_g, lse_g (``Saved``), which the op pair
saves instead of the sequence-sharded inputs (the same numel, R/Hkv more for replicated KV
heads), so the backward sends only dout (and a non-zero lse gradient) and the gradients back:
(u−1)/u of (dout, dq, dk, dv) per rank instead of (q, k, v, out, lse, dout, dq, dk, dv). This
is what DeepSpeed-Ulysses and USP do (their kernel saves its head-sharded inputs). The price is
memory under remat-aware checkpointing, where the ring saves only the layer input and
(out, lse) and recomputes q, k, v: here q_g, k_g, v_g, out_g stay saved besides out
(bench/ulysses.py measures both; ``full`` checkpointing recomputes the op and saves no more).

Under gloo with CUDA tensors (no NCCL) the all-to-alls go through host buffers, as the ring's
transfers do (``comm.py``; ``set_host_staging`` forces it in tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

# the ring's staging decision and buffers: the all-to-all must stage exactly when the ring does
from .comm import RingComm, _host_buffer, _needs_host_staging, empty_wire, to_wire_layout
from .ring import RingConfig, ring_backward, ring_forward
from .stats import record

__all__ = ["UlyssesGroups", "Saved", "ulysses_groups", "kv_heads_on_wire", "check_heads", "working_degrees",
           "saved_shapes", "ulysses_forward", "ulysses_backward"]


@dataclass(frozen=True)
class UlyssesGroups:
    """The two sub-groups of a sequence group of P ranks for Ulysses degree u: ``a2a`` (the u
    consecutive ranks of this rank's group; None when u = 1) and ``ring`` (the G = P/u ranks with
    this rank's index inside their group; None when G = 1)."""

    u: int
    G: int
    index: int                          # this rank's index j inside its all-to-all group
    a2a: dist.ProcessGroup | None
    ring: dist.ProcessGroup | None


_groups: dict = {}


def _subgroup(ranks: list[int]) -> dist.ProcessGroup:
    """A process group of global ``ranks``; only its members call (local synchronisation), so
    P/u all-to-all groups and u ring groups need no world-wide collective. Cached by ranks: the
    group's name is a hash of its ranks, so making it twice would collide."""
    key = tuple(ranks)
    if key not in _groups:
        _groups[key] = dist.new_group(ranks=list(ranks), use_local_synchronization=True)
    return _groups[key]


def ulysses_groups(group: dist.ProcessGroup | None, u: int) -> UlyssesGroups:
    """Sub-groups for degree ``u`` of ``group`` (None: a group of one). Every rank of the group
    calls it at the same point (the op runs SPMD), all-to-all group first, so creation pairs up."""
    if group is None:
        return UlyssesGroups(1, 1, 0, None, None)
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    g, j = divmod(rank, u)
    if u == P:
        return UlyssesGroups(u, 1, j, group, None)
    if u == 1:
        return UlyssesGroups(1, P, 0, None, group)
    ranks = dist.get_process_group_ranks(group)
    a2a = _subgroup([ranks[g * u + i] for i in range(u)])
    ring = _subgroup([ranks[h * u + j] for h in range(P // u)])
    return UlyssesGroups(u, P // u, j, a2a, ring)


def kv_heads_on_wire(Hq: int, Hkv: int, u: int) -> int:
    """The KV head count the all-to-all sends: Hkv when u divides it, else lcm(Hkv, u)."""
    return Hkv if Hkv % u == 0 else math.lcm(Hkv, u)


def working_degrees(P: int, Hq: int) -> list[int]:
    """Ulysses degrees that work for P ranks and Hq query heads: divisors of P dividing Hq."""
    return [d for d in range(1, P + 1) if P % d == 0 and Hq % d == 0]


def check_heads(Hq: int, Hkv: int, u: int, P: int) -> None:
    """Clear errors for a degree that cannot split this attention, naming the values that work."""
    if u < 1 or u > P:
        raise ValueError(f"the Ulysses degree {u} must be between 1 and the sequence group's size {P} (it is the "
                         f"number of ranks of one all-to-all group)")
    if P % u:
        ok = [d for d in range(1, P + 1) if P % d == 0]
        raise ValueError(f"the Ulysses degree {u} must divide the sequence group's size {P}: ranks form P/u groups "
                         f"of u; degrees that divide {P}: {', '.join(map(str, ok))}")
    if Hq % u:
        ok = working_degrees(P, Hq)
        hybrid = [d for d in ok if 1 < d < P]
        hint = (f"schedule 'hybrid' with ulysses_degree (SEQPAR_ULYSSES_DEGREE) in {{{', '.join(map(str, hybrid))}}}, "
                if hybrid else "")
        raise ValueError(f"all-to-all attention over {u} ranks splits the {Hq} query heads into {u} parts: the query "
                         f"head count must be a multiple of {u}. With {P} ranks and {Hq} heads, use {hint}a ring "
                         f"schedule (ring, zigzag, striped, distflash), or a group size P whose divisors include a "
                         f"divisor of {Hq}; degrees that work here: {', '.join(map(str, ok))}")
    # Hkv need not divide by u: KV heads are replicated to lcm(Hkv, u), which divides Hq
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for GQA/MQA")


def _all_to_all(send: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``send`` [u, ...] contiguous → recv [u, ...]: recv[i] is what rank i sent to this rank."""
    u = send.shape[0]
    nbytes = send.numel() * send.element_size() * (u - 1) // u
    record(a2a_bytes_sent=nbytes, a2a_bytes_received=nbytes)
    if _needs_host_staging(group, send.device):
        host_send, host_recv = _host_buffer(send), _host_buffer(send)
        host_send.copy_(send)
        dist.all_to_all_single(host_recv, host_send, group=group)
        record(host_staged_bytes=2 * nbytes)       # as the ring counts it: the traffic, sent + received
        return host_recv.to(send.device)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup | None, u: int) -> torch.Tensor:
    """[B, H, S_l, D] (any strides) → [B, H/u, u·S_l, D] in the wire layout: head group j of every
    rank's rows goes to rank j, rows in the group's order."""
    if u == 1:
        return x
    B, H, S_l, D = x.shape
    send = x.transpose(1, 2).reshape(B, S_l, u, H // u, D).permute(2, 0, 1, 3, 4).contiguous()
    recv = _all_to_all(send, group)                                  # [u(src), B, S_l, H/u, D]
    full = recv.permute(1, 0, 2, 3, 4).reshape(B, u * S_l, H // u, D)
    return full.transpose(1, 2)


def sequence_to_heads(y: torch.Tensor, group: dist.ProcessGroup | None, u: int, dtype=None) -> torch.Tensor:
    """The inverse: [B, H/u, u·S_l, D] → [B, H, S_l, D] in the wire layout (cast to ``dtype``)."""
    dtype = dtype or y.dtype
    if u == 1:
        out = empty_wire(y.shape, dtype, y.device)
        return out.copy_(y)
    B, Hu, S_g, D = y.shape
    S_l = S_g // u
    send = y.transpose(1, 2).reshape(B, u, S_l, Hu, D).permute(1, 0, 2, 3, 4).to(dtype).contiguous()
    recv = _all_to_all(send, group)                                  # [u(src), B, S_l, H/u, D]
    out = empty_wire((B, Hu * u, S_l, D), dtype, y.device)
    out.transpose(1, 2).view(B, S_l, u, Hu, D).copy_(recv.permute(1, 2, 0, 3, 4))
    return out


def _rows_to_heads(lse: torch.Tensor, group, u: int) -> torch.Tensor:
    """lse-like [B, H/u, u·S_l] → [B, H, S_l] contiguous."""
    if u == 1:
        return lse.contiguous()
    B, Hu, S_g = lse.shape
    send = lse.reshape(B, Hu, u, S_g // u).permute(2, 0, 1, 3).contiguous()
    return _all_to_all(send, group).permute(1, 0, 2, 3).reshape(B, Hu * u, S_g // u)


def _heads_to_rows(lse: torch.Tensor, group, u: int) -> torch.Tensor:
    """The inverse of ``_rows_to_heads``: [B, H, S_l] → [B, H/u, u·S_l]."""
    if u == 1:
        return lse.contiguous()
    B, H, S_l = lse.shape
    send = lse.reshape(B, u, H // u, S_l).transpose(0, 1).contiguous()
    return _all_to_all(send, group).permute(1, 2, 0, 3).reshape(B, H // u, u * S_l)


def _gather_docs(doc: torch.Tensor | None, group, u: int) -> torch.Tensor | None:
    """doc [B, S_l] → [B, u·S_l]: the group's per-token data (document ids, key validity) in
    the group's row order."""
    if doc is None or u == 1:
        return doc
    record(a2a_bytes_sent=doc.numel() * doc.element_size() * (u - 1),
           a2a_bytes_received=doc.numel() * doc.element_size() * (u - 1))
    if _needs_host_staging(group, doc.device):
        host = doc.cpu()
        parts = [torch.empty_like(host) for _ in range(u)]
        dist.all_gather(parts, host, group=group)
        record(host_staged_bytes=2 * (u - 1) * host.numel() * host.element_size())
        return torch.cat(parts, dim=1).to(doc.device)
    parts = [torch.empty_like(doc) for _ in range(u)]
    dist.all_gather(parts, doc.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _replicate_kv(x: torch.Tensor, R: int) -> torch.Tensor:
    """[B, Hkv, S_l, D] → [B, R, S_l, D], each KV head repeated R/Hkv times (adjacent copies)."""
    Hkv = x.shape[1]
    return x if R == Hkv else x.repeat_interleave(R // Hkv, dim=1)


def _sum_replicas(dx: torch.Tensor, Hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, R, S_l, D] → [B, Hkv, S_l, D] of ``dtype`` in the wire layout: a replicated head's
    gradient is the sum of its copies' (summed in fp32 at least)."""
    B, R, S_l, D = dx.shape
    if R == Hkv:
        return to_wire_layout(dx.to(dtype))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = empty_wire((B, Hkv, S_l, D), dtype, dx.device)
    return out.copy_(dx.reshape(B, Hkv, R // Hkv, S_l, D).to(acc).sum(dim=2))


def _inner(cfg: RingConfig, groups: UlyssesGroups, Hq: int) -> tuple[RingConfig, RingComm]:
    """The ring across groups (zigzag over G ranks; one local block when G = 1), over this
    rank's 1/u of the heads (its slice of the ALiBi slopes and of the relative-position table)."""
    slopes = cfg.alibi_slopes
    if slopes is not None:
        Hu = Hq // groups.u
        slopes = slopes[groups.index * Hu:(groups.index + 1) * Hu].contiguous()
    table, table_grad = cfg.rel_bias, cfg.rel_bias_grad
    if table is not None:
        Hu = Hq // groups.u
        table = table[groups.index * Hu:(groups.index + 1) * Hu].contiguous()
        if table_grad is not None:          # a view: the inner ring adds into this rank's heads' rows
            table_grad = table_grad[groups.index * Hu:(groups.index + 1) * Hu]
    inner = RingConfig(schedule="zigzag" if groups.G > 1 else "ring", spec=cfg.spec, kernel=cfg.kernel,
                       overlap=cfg.overlap, alibi_slopes=slopes, rel_bias=table, rel_bias_grad=table_grad)
    return inner, RingComm(groups.ring)


class Saved(NamedTuple):
    """What the forward had after its all-to-all, kept for the backward (head-sharded, the
    group's rows): q_g [B, Hq/u, S_g, D], k_g/v_g [B, R/u, S_g, D|Dv], out_g [B, Hq/u, S_g, Dv]
    (wire layout), lse_g [B, Hq/u, S_g] contiguous."""

    q_g: torch.Tensor
    k_g: torch.Tensor
    v_g: torch.Tensor
    out_g: torch.Tensor
    lse_g: torch.Tensor


def saved_shapes(q_shape, kv_heads: int, Dv: int, u: int) -> tuple[tuple, ...]:
    """Shapes of ``Saved`` for q [B, Hq, S_l, D] with ``kv_heads`` Hkv and degree u (fake kernels)."""
    B, Hq, S_l, D = q_shape
    R = kv_heads_on_wire(Hq, kv_heads, u)
    S_g = u * S_l
    return (B, Hq // u, S_g, D), (B, R // u, S_g, D), (B, R // u, S_g, Dv), (B, Hq // u, S_g, Dv), (B, Hq // u, S_g)


def _owned_wire(x: torch.Tensor, u: int) -> torch.Tensor:
    """``x`` in the wire layout, and a copy when u = 1 (where the all-to-all is the identity):
    a custom op's outputs may not alias its inputs or each other."""
    if u > 1:
        return to_wire_layout(x)
    if x.dim() == 4:
        return empty_wire(x.shape, x.dtype, x.device).copy_(x)
    return x.clone(memory_format=torch.contiguous_format)


def ulysses_forward(q, k, v, doc, cfg: RingConfig, groups: UlyssesGroups, kvalid=None
                    ) -> tuple[torch.Tensor, torch.Tensor, Saved]:
    """Exact attention of the local queries over the whole sequence → (out, lse, saved): out
    and lse of the local rows, and the head-sharded tensors the backward needs (``Saved``)."""
    u, g = groups.u, groups.a2a
    Hq, Hkv = q.shape[1], k.shape[1]
    R = kv_heads_on_wire(Hq, Hkv, u)
    q_g = heads_to_sequence(q, g, u)
    k_g = heads_to_sequence(_replicate_kv(k, R), g, u)
    v_g = heads_to_sequence(_replicate_kv(v, R), g, u)
    doc_g, kvalid_g = _gather_docs(doc, g, u), _gather_docs(kvalid, g, u)
    inner, comm = _inner(cfg, groups, Hq)
    out_g, lse_g = ring_forward(q_g, k_g, v_g, doc_g, inner, comm, kvalid_g)
    out, lse = sequence_to_heads(out_g, g, u, q.dtype), _rows_to_heads(lse_g, g, u)
    saved = Saved(*(_owned_wire(t, u) for t in (q_g, k_g, v_g, out_g)), _owned_wire(lse_g, u))
    return out, lse, saved


def ulysses_backward(dout, saved: Saved, doc, kv_heads: int, cfg: RingConfig, groups: UlyssesGroups, dlse=None,
                     kvalid=None):
    """Gradients (dq, dk, dv) of ``ulysses_forward`` from its ``saved`` tensors: only dout (and
    dlse) travel in, the gradients back; in the inputs' dtypes and the wire layout. ``kv_heads``
    is k's head count Hkv (the replicas' gradients are summed back to it)."""
    u, g = groups.u, groups.a2a
    q_g, k_g, v_g, out_g, lse_g = saved
    dout_g = heads_to_sequence(dout, g, u)
    dlse_g = None if dlse is None else _heads_to_rows(dlse, g, u)
    # [B, S_l] per-token data: 1/(H·D) of a head tensor's bytes, not worth saving
    doc_g, kvalid_g = _gather_docs(doc, g, u), _gather_docs(kvalid, g, u)
    inner, comm = _inner(cfg, groups, q_g.shape[1] * u)
    dq_g, dk_g, dv_g = ring_backward(dout_g, q_g, k_g, v_g, out_g, lse_g, doc_g, inner, comm, dlse_g, kvalid_g)
    dq = sequence_to_heads(dq_g, g, u, q_g.dtype)
    dk = _sum_replicas(sequence_to_heads(dk_g, g, u), kv_heads, k_g.dtype)
    dv = _sum_replicas(sequence_to_heads(dv_g, g, u), kv_heads, v_g.dtype)
    return dq, dk, dv
