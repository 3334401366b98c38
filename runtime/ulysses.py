"""All-to-all (Ulysses) attention and the Ulysses × ring hybrid: the algorithm (issue 15).

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

The backward redoes the all-to-all of q, k, v, out, lse and dout (no attention is recomputed;
only local shards are saved, like the ring) and sends dq, dk, dv back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import RingComm, empty_wire, to_wire_layout
from .ring import RingConfig, ring_backward, ring_forward
from .stats import record

__all__ = ["UlyssesGroups", "ulysses_groups", "kv_heads_on_wire", "check_heads", "working_degrees",
           "ulysses_forward", "ulysses_backward"]


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
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    u = send.shape[0]
    nbytes = send.numel() * send.element_size() * (u - 1) // u
    record(a2a_bytes_sent=nbytes, a2a_bytes_received=nbytes)
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
    """doc [B, S_l] → [B, u·S_l]: the group's document ids in the group's row order."""
    if doc is None or u == 1:
        return doc
    parts = [torch.empty_like(doc) for _ in range(u)]
    dist.all_gather(parts, doc.contiguous(), group=group)
    record(a2a_bytes_sent=doc.numel() * doc.element_size() * (u - 1),
           a2a_bytes_received=doc.numel() * doc.element_size() * (u - 1))
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
    rank's 1/u of the heads (its slice of the ALiBi slopes)."""
    slopes = cfg.alibi_slopes
    if slopes is not None:
        Hu = Hq // groups.u
        slopes = slopes[groups.index * Hu:(groups.index + 1) * Hu].contiguous()
    inner = RingConfig(schedule="zigzag" if groups.G > 1 else "ring", causal=cfg.causal, window=cfg.window,
                       scale=cfg.scale, kernel=cfg.kernel, overlap=cfg.overlap, alibi_slopes=slopes,
                       softcap=cfg.softcap)
    return inner, RingComm(groups.ring)


def ulysses_forward(q, k, v, doc, cfg: RingConfig, groups: UlyssesGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of the local queries over the whole sequence → (out, lse), local rows."""
    u, g = groups.u, groups.a2a
    Hq, Hkv = q.shape[1], k.shape[1]
    R = kv_heads_on_wire(Hq, Hkv, u)
    q_g = heads_to_sequence(q, g, u)
    k_g = heads_to_sequence(_replicate_kv(k, R), g, u)
    v_g = heads_to_sequence(_replicate_kv(v, R), g, u)
    doc_g = _gather_docs(doc, g, u)
    inner, comm = _inner(cfg, groups, Hq)
    out_g, lse_g = ring_forward(q_g, k_g, v_g, doc_g, inner, comm)
    return sequence_to_heads(out_g, g, u, q.dtype), _rows_to_heads(lse_g, g, u)


def ulysses_backward(dout, q, k, v, out, lse, doc, cfg: RingConfig, groups: UlyssesGroups, dlse=None):
    """Gradients (dq, dk, dv) of ``ulysses_forward``, in the inputs' dtypes and the wire layout."""
    u, g = groups.u, groups.a2a
    Hq, Hkv = q.shape[1], k.shape[1]
    R = kv_heads_on_wire(Hq, Hkv, u)
    q_g = heads_to_sequence(q, g, u)
    k_g = heads_to_sequence(_replicate_kv(k, R), g, u)
    v_g = heads_to_sequence(_replicate_kv(v, R), g, u)
    out_g = heads_to_sequence(out, g, u)
    dout_g = heads_to_sequence(dout, g, u)
    lse_g = _heads_to_rows(lse, g, u)
    dlse_g = None if dlse is None else _heads_to_rows(dlse, g, u)
    doc_g = _gather_docs(doc, g, u)
    inner, comm = _inner(cfg, groups, Hq)
    dq_g, dk_g, dv_g = ring_backward(dout_g, q_g, k_g, v_g, out_g, lse_g, doc_g, inner, comm, dlse_g)
    dq = sequence_to_heads(dq_g, g, u, q.dtype)
    dk = _sum_replicas(sequence_to_heads(dk_g, g, u), Hkv, k.dtype)
    dv = _sum_replicas(sequence_to_heads(dv_g, g, u), Hkv, v.dtype)
    return dq, dk, dv
