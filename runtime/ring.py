"""The ring loops: exact blockwise attention over a process group, forward and backward.

Shape legend (local shards; the sequence dim is sharded in the schedule's layout):
  q, out, dout  [B, Hq, S_local, D]      k, v  [B, Hkv, S_local, D]   (Hq % Hkv == 0)
  lse           [B, Hq, S_local] fp32 (fp64 for fp64 inputs)
  doc           [B, S_local] integer document ids, or None

Forward, at every step of the plan (``plan.py``): post the transfers for the next step (the
next KV block from the previous rank, queries for a help task), compute this step's blocks,
then wait — so communication hides behind compute (``overlap=False`` waits right away, for
comparison). Partial results are merged in fp32 with the order-independent online-softmax
merge, so blocks may arrive in any order:

    lse_new = max + log1p(exp(min - max))          (max/min of lse, lse_b)
    out_new = out - sigmoid(lse_b - lse) * (out - out_b)

Backward: the same plan again with the *merged* (out, lse); the K/V block travels ahead and its
fp32 dK/dV accumulator follows one hop behind, then goes home from the last rank that used it.
dQ accumulates locally; help tasks send dQ back. Never more than two KV blocks are held.

Transfers sent at the end of a step (results, accumulators) are received at the start of the
next one, so every pair of ranks posts its messages in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seqpar_compiler.kernels import (BlockKind, block_attention_backward, block_attention_forward,
                                     classify_block, visible_key_range)

from .comm import Pending, RingComm, Transfer
from .layout import Segment, local_segments
from .plan import RingPlan, build_plan, segment_mask
from .stats import counting, record

__all__ = ["RingConfig", "ring_forward", "ring_backward", "merge_partial_attention"]


@dataclass(frozen=True)
class RingConfig:
    schedule: str
    causal: bool
    window: int | None
    scale: float
    kernel: str          # resolved kernel name
    overlap: bool


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_partial_attention(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor,
                            lse_b: torch.Tensor) -> None:
    """Merge block result (out_b [.., M, D], lse_b [.., M]) into (out, lse) in place.

    NaN-free when either or both lse are -inf (rows that saw no key so far / in this block).
    """
    lse_b = lse_b.to(lse.dtype)
    hi = torch.maximum(lse, lse_b)
    lo = torch.minimum(lse, lse_b)
    both_dead = torch.isneginf(hi)
    new_lse = torch.where(both_dead, hi, hi + torch.log1p(torch.exp(lo - torch.where(both_dead, 0.0, hi))))
    d = torch.where(torch.isneginf(lse_b), float("-inf"),
                    torch.where(torch.isneginf(lse), float("inf"), lse_b - lse))
    out.sub_(torch.sigmoid(d)[..., None] * (out - out_b.to(out.dtype)))
    lse.copy_(new_lse)


def _pairs(mask, M: int, N: int, kind: BlockKind) -> int:
    if kind is BlockKind.FULL or not mask.positional:
        return M * N
    lo, hi = visible_key_range(mask, M, N)
    return int((hi - lo).clamp(min=0).sum())


def _blocks(q_segs, kv_segs, cfg: RingConfig, q_doc, k_doc):
    """The kernel calls of one (queries, KV block) pair: (q segment, kv segment, mask, kind).

    Segment pairs that are empty are skipped. Pairs that one kernel call can do together are
    coalesced, since a few large calls run faster than many small ones:
      * all non-empty pairs full and forming one rectangle of local rows → one unmasked call
        (zigzag: a past or future block is two full chunk pairs);
      * a rank's own block under a plain causal mask → one causal call in local coordinates
        (positions increase along the local rows, so k_pos <= q_pos iff k_local <= q_local).
    """
    pairs = []
    for qs in q_segs:
        for ks in kv_segs:
            qd = None if q_doc is None else q_doc[:, qs.offset:qs.offset + qs.count]
            kd = None if k_doc is None else k_doc[:, ks.offset:ks.offset + ks.count]
            mask = segment_mask(qs, ks, cfg.causal, cfg.window, qd, kd)
            kind = classify_block(mask, qs.count, ks.count)
            if kind is not BlockKind.EMPTY:
                pairs.append((qs, ks, mask, kind))
    if len(pairs) <= 1:
        return pairs
    if all(kind is BlockKind.FULL for *_, kind in pairs):
        rows, keys = _span({qs for qs, *_ in pairs}), _span({ks for _, ks, *_ in pairs})
        if rows and keys and len(pairs) == len({qs for qs, *_ in pairs}) * len({ks for _, ks, *_ in pairs}):
            return [(rows, keys, segment_mask(rows, keys, False, None), BlockKind.FULL)]
    if q_segs == kv_segs and cfg.causal and cfg.window is None:
        local = Segment(0, 0, sum(seg.count for seg in q_segs))
        return [(local, local, segment_mask(local, local, True, None, q_doc, k_doc), BlockKind.PARTIAL)]
    return pairs


def _span(segs) -> Segment | None:
    """One segment covering ``segs`` if they are adjacent in local rows (positions unused)."""
    segs = sorted(segs, key=lambda seg: seg.offset)
    for a, b in zip(segs, segs[1:]):
        if a.offset + a.count != b.offset:
            return None
    return Segment(segs[0].offset, 0, sum(seg.count for seg in segs))


def _attend(q, q_segs, q_doc, k, v, k_doc, kv_segs, cfg: RingConfig, out, lse) -> None:
    """Merge attention of queries against one KV block into (out, lse)."""
    B, Hq, _, D = q.shape
    for qs, ks, mask, kind in _blocks(q_segs, kv_segs, cfg, q_doc, k_doc):
        rows, keys = slice(qs.offset, qs.offset + qs.count), slice(ks.offset, ks.offset + ks.count)
        o_b, lse_b = block_attention_forward(q[:, :, rows], k[:, :, keys], v[:, :, keys], mask,
                                             cfg.scale, cfg.kernel)
        merge_partial_attention(out[:, :, rows], lse[:, :, rows], o_b, lse_b)
        if counting():         # the visible-pair count of a partial block costs a pass over its rows
            record(block_kernel_calls=1, attention_flops=4 * B * Hq * D * _pairs(mask, qs.count, ks.count, kind))


def _attend_backward(dout, q, out, lse, q_segs, q_doc, k, v, k_doc, kv_segs, cfg: RingConfig,
                     dq, dk, dv, dlse) -> None:
    """Accumulate gradients of queries against one KV block into dq, dk, dv (fp32)."""
    B, Hq, _, D = q.shape
    for qs, ks, mask, kind in _blocks(q_segs, kv_segs, cfg, q_doc, k_doc):
        rows, keys = slice(qs.offset, qs.offset + qs.count), slice(ks.offset, ks.offset + ks.count)
        dq_b, dk_b, dv_b = block_attention_backward(
            dout[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows],
            lse[:, :, rows], mask, cfg.scale, cfg.kernel, None if dlse is None else dlse[:, :, rows])
        dq[:, :, rows] += dq_b
        dk[:, :, keys] += dk_b
        dv[:, :, keys] += dv_b
        if counting():         # the visible-pair count of a partial block costs a pass over its rows
            record(block_kernel_calls=1, attention_flops=4 * B * Hq * D * _pairs(mask, qs.count, ks.count, kind))


def _kv_transfers(send: bool, block, peer: int, step: int) -> list[Transfer]:
    k, v, doc = block
    out = [Transfer(send, k, peer, "k", step), Transfer(send, v, peer, "v", step)]
    if doc is not None:
        out.append(Transfer(send, doc, peer, "doc", step))
    return out


def _kv_prefetch(st, held, own, comm: RingComm, t: int):
    """The transfers that move KV blocks one hop for step t+1, and the buffer of the incoming one.

    ``held`` is (k, v, doc) of the block held now (None if none); ``own`` is this rank's block,
    whose shapes every block shares."""
    transfers, nxt = [], None
    if st.forward_kv:
        transfers += _kv_transfers(True, held, comm.next, t)
    if st.receive_kv:
        nxt = tuple(None if x is None else torch.empty_like(x) for x in own)
        transfers += _kv_transfers(False, nxt, comm.prev, t)
    return transfers, nxt


class _Loop:
    """State shared by the forward and backward loops of one call."""

    def __init__(self, q, doc, cfg: RingConfig, comm: RingComm):
        self.comm, self.cfg = comm, cfg
        self.P, self.rank = comm.size, comm.rank
        self.S = q.shape[2]
        self.plan: RingPlan = build_plan(cfg.schedule, self.P, self.S, cfg.causal, cfg.window)
        self.sent: list[tuple[int, Pending]] = []   # (step, end-of-step sends still in flight)

    def segs(self, owner: int) -> tuple[Segment, ...]:
        return local_segments(self.cfg.schedule, owner, self.P, self.S)

    def send(self, step: int, pending: Pending) -> None:
        self.sent.append((step, pending))

    def release(self, before_step: int) -> None:
        """Wait for the end-of-step sends posted before ``before_step`` and drop their buffers.

        Called at the end of step t for the sends of step t-1: their receivers post the receive
        at the start of step t, so by then they are (nearly) done, and holding every step's
        dK/dV accumulators until the end would grow a rank's memory with P. Deadlock-free: the
        rank furthest behind only waits for receives that every rank at its step or later has
        already posted."""
        keep = []
        for step, p in self.sent:
            if step < before_step:
                p.wait()
            else:
                keep.append((step, p))
        self.sent = keep

    def finish(self) -> None:
        self.release(self.plan.num_steps + 1)


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor | None,
                 cfg: RingConfig, comm: RingComm) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of the local queries over the whole group's keys → (out, lse)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()       # P2P sends whole buffers
    doc = None if doc is None else doc.contiguous()
    L = _Loop(q, doc, cfg, comm)
    r, plan = L.rank, L.plan
    acc = _acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    results = {t: (torch.empty_like(out), torch.empty_like(lse), h) for t, h in plan.helpers[r]}
    late: list[Pending] = []
    held, help_q = (k, v, doc), None
    for t, steps in enumerate(plan.steps):
        st = steps[r]
        # Results a helper sent at the end of step t-1 (posted first: see module docstring).
        if t - 1 in results:
            o_buf, l_buf, h = results[t - 1]
            late.append(comm.post([Transfer(False, o_buf, h, "res_out", t - 1),
                                   Transfer(False, l_buf, h, "res_lse", t - 1)], f"helper results of step {t - 1}"))
        transfers, nxt = _kv_prefetch(st, held, (k, v, doc), comm, t)
        nxt_q = None
        if st.q_to is not None:
            transfers.append(Transfer(True, q, st.q_to, "q", t))
            if doc is not None:
                transfers.append(Transfer(True, doc, st.q_to, "q_doc", t))
        if st.q_from is not None:
            nxt_q = (torch.empty_like(q), None if doc is None else torch.empty_like(doc))
            transfers.append(Transfer(False, nxt_q[0], st.q_from, "q", t))
            if doc is not None:
                transfers.append(Transfer(False, nxt_q[1], st.q_from, "q_doc", t))
        pending = comm.post(transfers, f"the KV block for step {t + 1} (forward)")
        if not cfg.overlap:
            pending.wait()
        if st.compute_own:
            hk, hv, hdoc = held
            _attend(q, L.segs(r), doc, hk, hv, hdoc, L.segs(st.holds), cfg, out, lse)
        if st.help_q is not None:
            fq, fdoc = help_q
            h_out = torch.zeros_like(out)
            h_lse = torch.full_like(lse, float("-inf"))
            _attend(fq, L.segs(st.help_q), fdoc, k, v, doc, L.segs(r), cfg, h_out, h_lse)
            L.send(t, comm.post([Transfer(True, h_out, st.help_q, "res_out", t),
                                 Transfer(True, h_lse, st.help_q, "res_lse", t)], "sending helper results"))
        pending.wait()
        L.release(t)
        held, help_q = nxt, nxt_q
    last = plan.num_steps - 1
    if last in results:
        o_buf, l_buf, h = results[last]
        late.append(comm.post([Transfer(False, o_buf, h, "res_out", last),
                               Transfer(False, l_buf, h, "res_lse", last)], f"helper results of step {last}"))
    for p in late:
        p.wait()
    for o_buf, l_buf, _ in results.values():
        merge_partial_attention(out, lse, o_buf, l_buf)
    L.finish()
    return out.to(q.dtype), lse


def ring_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, doc: torch.Tensor | None, cfg: RingConfig,
                  comm: RingComm, dlse: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the ring attention → (dq, dk, dv) in the inputs' dtypes."""
    dout, q, k, v, out, lse = (t.contiguous() for t in (dout, q, k, v, out, lse))
    doc = None if doc is None else doc.contiguous()
    L = _Loop(q, doc, cfg, comm)
    r, plan = L.rank, L.plan
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    home_dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    home_dv = torch.zeros_like(home_dk)
    dq_results = {t: (torch.empty_like(dq), h) for t, h in plan.helpers[r]}
    # the step at which our own KV block's journey ends (its accumulator then comes home)
    own_last = max(t for t in range(plan.num_steps) if plan.steps[t][(r + t) % L.P].holds == r)
    home_buf = None
    if plan.path_end[r] != r:
        home_buf = (torch.empty_like(home_dk), torch.empty_like(home_dv))
    late_done: list[Pending] = []
    held, help_in = (k, v, doc), None
    # what a helper needs of the queries it computes for us (at step t+1, sent at step t)
    bundle = [("q", q), ("dout", dout), ("out", out), ("lse", lse), ("dlse", dlse), ("q_doc", doc)]
    bundle = [(kind, x) for kind, x in bundle if x is not None]
    for t, steps in enumerate(plan.steps):
        st = steps[r]
        # 1. Receive what was sent at the end of step t-1: accumulator of the block held now,
        #    the own block's accumulator coming home, dQ from a helper.
        late, acc_in = [], None
        if t > 0 and steps[r].holds is not None and steps[r].holds != r:
            acc_in = (torch.empty_like(home_dk), torch.empty_like(home_dv))
            late += [Transfer(False, acc_in[0], comm.prev, "acc_dk", t - 1),
                     Transfer(False, acc_in[1], comm.prev, "acc_dv", t - 1)]
        if home_buf is not None and t - 1 == own_last:
            late += [Transfer(False, home_buf[0], plan.path_end[r], "home_dk", t - 1),
                     Transfer(False, home_buf[1], plan.path_end[r], "home_dv", t - 1)]
        if t - 1 in dq_results:
            late.append(Transfer(False, dq_results[t - 1][0], dq_results[t - 1][1], "res_dq", t - 1))
        late_pending = comm.post(late, f"dK/dV accumulators and dQ results of step {t - 1}")
        # 2. Prefetch the next step's KV block and help bundle.
        transfers, nxt = _kv_prefetch(st, held, (k, v, doc), comm, t)
        nxt_help = None
        if st.q_to is not None:
            transfers += [Transfer(True, x, st.q_to, kind, t) for kind, x in bundle]
        if st.q_from is not None:
            nxt_help = {kind: torch.empty_like(x) for kind, x in bundle}
            transfers += [Transfer(False, x, st.q_from, kind, t) for kind, x in nxt_help.items()]
        pending = comm.post(transfers, f"the KV block for step {t + 1} (backward)")
        if not cfg.overlap:
            pending.wait()
        # 3. Own block: dQ locally, dK/dV into the travelling accumulator.
        if st.holds is not None:
            hk, hv, hdoc = held
            # accumulate straight into the incoming accumulator (one pair of KV-sized fp32
            # buffers per step less); it was sent at the end of step t-1, so it is (nearly) here
            late_pending.wait()
            if acc_in is not None:
                dk_b, dv_b = acc_in
            else:
                dk_b, dv_b = torch.zeros_like(home_dk), torch.zeros_like(home_dv)
            if st.compute_own:
                _attend_backward(dout, q, out, lse, L.segs(r), doc, hk, hv, hdoc, L.segs(st.holds), cfg,
                                 dq, dk_b, dv_b, dlse)
            if st.forward_kv:
                L.send(t, comm.post([Transfer(True, dk_b, comm.next, "acc_dk", t),
                                     Transfer(True, dv_b, comm.next, "acc_dv", t)], "forwarding dK/dV"))
            elif st.holds != r:
                L.send(t, comm.post([Transfer(True, dk_b, st.holds, "home_dk", t),
                                     Transfer(True, dv_b, st.holds, "home_dv", t)], "sending dK/dV home"))
            else:
                home_dk += dk_b
                home_dv += dv_b
        else:
            late_done.append(late_pending)
        # 4. Help task: gradients of another rank's queries against our own KV.
        if st.help_q is not None:
            f = help_in
            f_dq = torch.zeros_like(dq)
            _attend_backward(f["dout"], f["q"], f["out"], f["lse"], L.segs(st.help_q), f.get("q_doc"), k, v,
                             doc, L.segs(r), cfg, f_dq, home_dk, home_dv, f.get("dlse"))
            L.send(t, comm.post([Transfer(True, f_dq, st.help_q, "res_dq", t)], "sending dQ results"))
        pending.wait()
        L.release(t)
        held, help_in = nxt, nxt_help
    last = plan.num_steps - 1
    final = []
    if home_buf is not None and last == own_last:
        final += [Transfer(False, home_buf[0], plan.path_end[r], "home_dk", last),
                  Transfer(False, home_buf[1], plan.path_end[r], "home_dv", last)]
    if last in dq_results:
        final.append(Transfer(False, dq_results[last][0], dq_results[last][1], "res_dq", last))
    late_done.append(comm.post(final, "the last dK/dV and dQ results"))
    for p in late_done:
        p.wait()
    if home_buf is not None:
        home_dk += home_buf[0]
        home_dv += home_buf[1]
    for buf, _ in dq_results.values():
        dq += buf
    L.finish()
    return dq.to(q.dtype), home_dk.to(k.dtype), home_dv.to(v.dtype)
