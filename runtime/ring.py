"""The ring loops: exact blockwise attention over a process group, forward and backward.

Shape legend (local shards; the sequence dim is sharded in the schedule's layout):
  q  [B, Hq, S_local, D]      k  [B, Hkv, S_local, D]      v  [B, Hkv, S_local, Dv]
  out, dout     [B, Hq, S_local, Dv]  (Hq % Hkv == 0; Dv may differ from D, as in MLA)
  lse           [B, Hq, S_local] fp32 (fp64 for fp64 inputs)
  doc           [B, S_local] integer document ids, or None
  kvalid        [B, S_local] bool key validity (a padding mask), or None
  alibi_slopes  [Hq] float (``RingConfig``), or None
  rel_bias      [Hq, 2S - 1] float (``RingConfig``): the bias of every offset k_pos - q_pos, or None

What is computed is the ``AttentionSpec`` (``RingConfig.spec``): each block's ``BlockMask``
holds it with the global positions of the block's rows and their per-token data, and the
block's kernel evaluates visibility and score semantics (ALiBi bias, soft-capping) from those,
so no S×S mask or bias exists anywhere. Per-key data (document ids, key validity) travels
around the ring with its K/V block; the slopes and the relative-position table never travel. A block whose keys are all
invalid is skipped; a block whose keys are all valid runs without the padding (the kernels'
unmasked fast paths).

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

from seqpar_compiler.kernels import (AttentionSpec, BlockKind, block_attention_backward,
                                     block_attention_forward, classify_block, visible_key_range)

from .comm import Pending, RingComm, Transfer, empty_wire, empty_wire_like, in_wire_layout, to_wire_layout
from .layout import Segment, local_segments
from .plan import RingPlan, build_plan, segment_mask
from .stats import counting, record

__all__ = ["RingConfig", "ring_forward", "ring_backward", "merge_partial_attention"]


@dataclass(frozen=True)
class RingConfig:
    """One ring call: what it computes (``spec``, with its scale) and how (layout, kernel)."""

    schedule: str
    spec: AttentionSpec
    kernel: str          # resolved kernel name
    overlap: bool
    alibi_slopes: torch.Tensor | None = None   # [Hq] with ``spec.alibi``: scores += slopes[h] · (k_pos − q_pos)
    rel_bias: torch.Tensor | None = None       # [Hq, 2S - 1] with ``spec.rel_bias``: scores += table[h, k - q + S - 1]
    # [Hq, 2S - 1] fp32/fp64, backward only, for a learned table: every block adds its gradient here
    rel_bias_grad: torch.Tensor | None = None

    @property
    def scale(self) -> float:
        return self.spec.scale


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_partial_attention(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor,
                            lse_b: torch.Tensor) -> None:
    """Merge block result (out_b [.., M, D], lse_b [.., M]) into (out, lse) in place.

    NaN-free when either or both lse are -inf (rows that saw no key so far / in this block).
    ``out += w · (out_b - out)`` runs as one fused ``lerp_``: no activation-sized temporaries.
    """
    lse_b = lse_b.to(lse.dtype)
    hi = torch.maximum(lse, lse_b)
    lo = torch.minimum(lse, lse_b)
    both_dead = torch.isneginf(hi)
    new_lse = torch.where(both_dead, hi, hi + torch.log1p(torch.exp(lo - torch.where(both_dead, 0.0, hi))))
    d = torch.where(torch.isneginf(lse_b), float("-inf"),
                    torch.where(torch.isneginf(lse), float("inf"), lse_b - lse))
    out.lerp_(out_b.to(out.dtype), torch.sigmoid(d)[..., None])
    lse.copy_(new_lse)


def _owned(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a buffer of ``dtype`` in the wire layout that the caller may keep and write:
    ``x`` itself if it is a fresh result that owns its storage (not a view into another
    buffer) with that dtype and layout, else one copy."""
    if x.dtype == dtype and in_wire_layout(x) and x.untyped_storage().nbytes() == x.numel() * x.element_size():
        return x
    return empty_wire(x.shape, dtype, x.device).copy_(x)


class _Accumulator:
    """An fp32 (fp64) gradient buffer in the wire layout, allocated on first use.

    The first kernel result that covers the whole buffer *becomes* the buffer (``_owned``)
    instead of being added into a zero-filled one: at long local lengths each avoided buffer
    is one activation-sized tensor less at the backward's peak.
    """

    def __init__(self, shape, dtype: torch.dtype, device: torch.device, tensor: torch.Tensor | None = None):
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.value = tensor

    def add_(self, index: slice, part: torch.Tensor) -> None:
        """Add ``part`` into the rows ``index`` of the sequence dim (dim 2)."""
        if self.value is None and index == slice(0, self.shape[2]) and tuple(part.shape) == self.shape:
            self.value = _owned(part, self.dtype)
            return
        self.tensor()[:, :, index] += part

    def tensor(self) -> torch.Tensor:
        if self.value is None:
            self.value = empty_wire(self.shape, self.dtype, self.device, zero=True)
        return self.value


class _Partial:
    """A partial attention result (out fp32/fp64 in the wire layout, lse contiguous) that
    blocks merge into; the first block that covers every row becomes it (no merge into zeros)."""

    def __init__(self, q: torch.Tensor, Dv: int):
        self.shape, self.device = (*q.shape[:3], Dv), q.device
        self.dtype = _acc_dtype(q.dtype)
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None

    def merge(self, rows: slice, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
        if self.out is None and rows == slice(0, self.shape[2]) and tuple(out_b.shape) == self.shape:
            self.out, self.lse = _owned(out_b, self.dtype), lse_b.to(self.dtype).contiguous()
            return
        out, lse = self.result()
        merge_partial_attention(out[:, :, rows], lse[:, :, rows], out_b, lse_b)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.out is None:
            self.out = empty_wire(self.shape, self.dtype, self.device, zero=True)
            self.lse = torch.full(self.shape[:3], float("-inf"), dtype=self.dtype, device=self.device)
        return self.out, self.lse


def _flops(q: torch.Tensor, v: torch.Tensor, mask, M: int, N: int, kind: BlockKind) -> int:
    """2·B·Hq·(D + Dv) per visible (query, key) pair: q·k and p·v, one multiply-add each."""
    B, Hq, _, D = q.shape
    return 2 * B * Hq * (D + v.shape[-1]) * _pairs(mask, M, N, kind)


def _pairs(mask, M: int, N: int, kind: BlockKind) -> int:
    """Visible pairs by position (per-token data is not counted out: an estimate of the work
    the kernels do, which skip only whole tiles)."""
    if kind is BlockKind.FULL or not mask.positional:
        return M * N
    lo, hi = visible_key_range(mask, M, N)
    return int((hi - lo).clamp(min=0).sum())


def _rows(x: torch.Tensor | None, seg: Segment) -> torch.Tensor | None:
    return None if x is None else x[:, seg.offset:seg.offset + seg.count]


def _key_validity(kvalid: torch.Tensor | None, seg: Segment) -> torch.Tensor | None:
    """This segment's key validity [B, N], or None when every key is valid (kernels then run
    unmasked: a right-padded batch has padding in a few blocks only)."""
    part = _rows(kvalid, seg)
    return None if part is None or bool(part.all()) else part


def _blocks(q_segs, kv_segs, cfg: RingConfig, q_doc, k_doc, kvalid):
    """The kernel calls of one (queries, KV block) pair: (q segment, kv segment, mask, kind).

    Segment pairs that are empty are skipped. Pairs that one kernel call can do together are
    coalesced, since a few large calls run faster than many small ones (not with a bias from
    positions: it needs every row's true global position, which a coalesced call does not keep):
      * all non-empty pairs full and forming one rectangle of local rows → one unmasked call
        (zigzag: a past or future block is two full chunk pairs);
      * a rank's own block under a plain causal mask → one causal call in local coordinates
        (positions increase along the local rows, so k_pos <= q_pos iff k_local <= q_local).
    """
    spec = cfg.spec
    pairs = []
    for qs in q_segs:
        for ks in kv_segs:
            mask = segment_mask(qs, ks, spec, _rows(q_doc, qs), _rows(k_doc, ks), _key_validity(kvalid, ks),
                                cfg.alibi_slopes, cfg.rel_bias, cfg.rel_bias_grad)
            kind = classify_block(mask, qs.count, ks.count)
            if kind is not BlockKind.EMPTY:
                pairs.append((qs, ks, mask, kind))
    if len(pairs) <= 1 or cfg.alibi_slopes is not None or cfg.rel_bias is not None:
        return pairs
    if all(kind is BlockKind.FULL for *_, kind in pairs):
        rows, keys = _span({qs for qs, *_ in pairs}), _span({ks for _, ks, *_ in pairs})
        if rows and keys and len(pairs) == len({qs for qs, *_ in pairs}) * len({ks for _, ks, *_ in pairs}):
            return [(rows, keys, segment_mask(rows, keys, spec.with_(behind=None, ahead=None)), BlockKind.FULL)]
    if q_segs == kv_segs and spec.causal and spec.window is None:
        local = Segment(0, 0, sum(seg.count for seg in q_segs))
        return [(local, local, segment_mask(local, local, spec, q_doc, k_doc, _key_validity(kvalid, local)),
                 BlockKind.PARTIAL)]
    return pairs


def _span(segs) -> Segment | None:
    """One segment covering ``segs`` if they are adjacent in local rows (positions unused)."""
    segs = sorted(segs, key=lambda seg: seg.offset)
    for a, b in zip(segs, segs[1:]):
        if a.offset + a.count != b.offset:
            return None
    return Segment(segs[0].offset, 0, sum(seg.count for seg in segs))


def _attend(q, q_segs, q_doc, k, v, k_doc, kvalid, kv_segs, cfg: RingConfig, partial: _Partial) -> None:
    """Merge attention of queries against one KV block into ``partial``."""
    for qs, ks, mask, kind in _blocks(q_segs, kv_segs, cfg, q_doc, k_doc, kvalid):
        rows, keys = slice(qs.offset, qs.offset + qs.count), slice(ks.offset, ks.offset + ks.count)
        o_b, lse_b = block_attention_forward(q[:, :, rows], k[:, :, keys], v[:, :, keys], mask,
                                             cfg.scale, cfg.kernel)
        partial.merge(rows, o_b, lse_b)
        if counting():         # the visible-pair count of a partial block costs a pass over its rows
            record(block_kernel_calls=1, attention_flops=_flops(q, v, mask, qs.count, ks.count, kind))


def _attend_backward(dout, q, out, lse, q_segs, q_doc, k, v, k_doc, kvalid, kv_segs, cfg: RingConfig,
                     dq: _Accumulator, dk: _Accumulator, dv: _Accumulator, dlse) -> None:
    """Accumulate gradients of queries against one KV block into dq, dk, dv (fp32)."""
    for qs, ks, mask, kind in _blocks(q_segs, kv_segs, cfg, q_doc, k_doc, kvalid):
        rows, keys = slice(qs.offset, qs.offset + qs.count), slice(ks.offset, ks.offset + ks.count)
        dq_b, dk_b, dv_b = block_attention_backward(
            dout[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows],
            lse[:, :, rows], mask, cfg.scale, cfg.kernel, None if dlse is None else dlse[:, :, rows])
        dq.add_(rows, dq_b)
        dk.add_(keys, dk_b)
        dv.add_(keys, dv_b)
        if counting():         # the visible-pair count of a partial block costs a pass over its rows
            record(block_kernel_calls=1, attention_flops=_flops(q, v, mask, qs.count, ks.count, kind))


def _kv_transfers(send: bool, block, peer: int, step: int) -> list[Transfer]:
    """A KV block travels with its per-key data: (k, v, doc ids or None, key validity or None)."""
    k, v, doc, kvalid = block
    out = [Transfer(send, k, peer, "k", step), Transfer(send, v, peer, "v", step)]
    if doc is not None:
        out.append(Transfer(send, doc, peer, "doc", step))
    if kvalid is not None:
        out.append(Transfer(send, kvalid, peer, "kvalid", step))
    return out


def _kv_prefetch(st, held, own, comm: RingComm, t: int):
    """The transfers that move KV blocks one hop for step t+1, and the buffer of the incoming one.

    ``held`` is (k, v, doc, kvalid) of the block held now (None if none); ``own`` is this rank's block,
    whose shapes every block shares."""
    transfers, nxt = [], None
    if st.forward_kv:
        transfers += _kv_transfers(True, held, comm.next, t)
    if st.receive_kv:
        nxt = tuple(None if x is None else empty_wire_like(x) for x in own)
        transfers += _kv_transfers(False, nxt, comm.prev, t)
    return transfers, nxt


class _Loop:
    """State shared by the forward and backward loops of one call."""

    def __init__(self, q, cfg: RingConfig, comm: RingComm):
        self.comm, self.cfg = comm, cfg
        self.P, self.rank = comm.size, comm.rank
        self.S = q.shape[2]
        self.plan: RingPlan = build_plan(cfg.schedule, self.P, self.S, cfg.spec)
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


def _wire_q(q, doc):
    """The queries (and their document ids) as a help task sends them: in the wire layout."""
    return to_wire_layout(q), None if doc is None else doc.contiguous()


def _kv_data(x: torch.Tensor | None) -> torch.Tensor | None:
    """Per-key data as it travels: contiguous; key validity as bool."""
    return None if x is None else x.contiguous()


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor | None,
                 cfg: RingConfig, comm: RingComm, kvalid: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of the local queries over the whole group's keys → (out, lse).

    q, k, v may have any strides; K/V travel in the wire layout (a copy only if they are not
    in it already). ``out`` [B, Hq, S_local, Dv] comes back laid out as [B, S_local, Hq, Dv] in memory (the wire
    layout; ``ring_op``'s fake says the same), ``lse`` contiguous.
    """
    if comm.size > 1:                          # a group of one sends nothing
        k, v = to_wire_layout(k), to_wire_layout(v)
    doc, kvalid = _kv_data(doc), _kv_data(kvalid)
    L = _Loop(q, cfg, comm)
    r, plan = L.rank, L.plan
    Dv = v.shape[-1]
    partial = _Partial(q, Dv)
    helper_of = dict(plan.helpers[r])            # step -> the rank that computes some of our rows then
    results: list[tuple[torch.Tensor, torch.Tensor]] = []
    late: list[Pending] = []
    held, help_q, sent_q = (k, v, doc, kvalid), None, None

    def receive_results(step: int) -> None:
        if step in helper_of:
            o_buf = empty_wire(partial.shape, partial.dtype, q.device)
            l_buf = torch.empty(q.shape[:3], dtype=partial.dtype, device=q.device)
            results.append((o_buf, l_buf))
            late.append(comm.post([Transfer(False, o_buf, helper_of[step], "res_out", step),
                                   Transfer(False, l_buf, helper_of[step], "res_lse", step)],
                                  f"helper results of step {step}"))

    for t, steps in enumerate(plan.steps):
        st = steps[r]
        receive_results(t - 1)        # sent at the end of step t-1 (posted first: module docstring)
        transfers, nxt = _kv_prefetch(st, held, (k, v, doc, kvalid), comm, t)
        nxt_q = None
        if st.q_to is not None:
            sent_q = sent_q or _wire_q(q, doc)
            transfers.append(Transfer(True, sent_q[0], st.q_to, "q", t))
            if doc is not None:
                transfers.append(Transfer(True, sent_q[1], st.q_to, "q_doc", t))
        if st.q_from is not None:
            nxt_q = (empty_wire_like(q), None if doc is None else empty_wire_like(doc))
            transfers.append(Transfer(False, nxt_q[0], st.q_from, "q", t))
            if doc is not None:
                transfers.append(Transfer(False, nxt_q[1], st.q_from, "q_doc", t))
        pending = comm.post(transfers, f"the KV block for step {t + 1} (forward)")
        if not cfg.overlap:
            pending.wait()
        if st.compute_own:
            hk, hv, hdoc, hvalid = held
            _attend(q, L.segs(r), doc, hk, hv, hdoc, hvalid, L.segs(st.holds), cfg, partial)
        if st.help_q is not None:
            fq, fdoc = help_q
            helped = _Partial(fq, Dv)
            _attend(fq, L.segs(st.help_q), fdoc, k, v, doc, kvalid, L.segs(r), cfg, helped)
            h_out, h_lse = helped.result()
            L.send(t, comm.post([Transfer(True, to_wire_layout(h_out), st.help_q, "res_out", t),
                                 Transfer(True, h_lse.contiguous(), st.help_q, "res_lse", t)],
                                "sending helper results"))
        pending.wait()
        L.release(t)
        held, help_q = nxt, nxt_q
    receive_results(plan.num_steps - 1)
    for p in late:
        p.wait()
    for o_buf, l_buf in results:
        partial.merge(slice(0, q.shape[2]), o_buf, l_buf)
    L.finish()
    out, lse = partial.result()
    return out.to(q.dtype), lse


def ring_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, doc: torch.Tensor | None, cfg: RingConfig,
                  comm: RingComm, dlse: torch.Tensor | None = None, kvalid: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the ring attention → (dq, dk, dv) in the inputs' dtypes, laid out as
    [B, S_local, H, D] in memory (the wire layout; ``ring_op``'s fake says the same).

    Inputs may have any strides: K/V are put in the wire layout to travel (a copy only if they
    are not in it), the rest is read strided where it is, and copied only for a help task.
    Gradient buffers are allocated when first needed (``_Accumulator``), so at the backward's
    peak a rank holds its inputs, dQ, the KV block in hand and the next, and two dK/dV
    accumulator pairs (the one it fills and the one it sent a step ago).
    """
    if comm.size > 1:                          # a group of one sends nothing
        k, v = to_wire_layout(k), to_wire_layout(v)
    lse = lse.contiguous()
    doc, kvalid = _kv_data(doc), _kv_data(kvalid)
    L = _Loop(q, cfg, comm)
    r, plan = L.rank, L.plan
    acc = _acc_dtype(q.dtype)
    dq = _Accumulator(q.shape, acc, q.device)
    home_dk = _Accumulator(k.shape, acc, q.device)
    home_dv = _Accumulator(v.shape, acc, q.device)
    helper_of = dict(plan.helpers[r])
    dq_results: list[torch.Tensor] = []
    # the step at which our own KV block's journey ends (its accumulator then comes home)
    own_last = max(t for t in range(plan.num_steps) if plan.steps[t][(r + t) % L.P].holds == r)
    home_buf = None
    late_done: list[Pending] = []
    held, help_in, bundle = (k, v, doc, kvalid), None, None
    # what a helper needs of the queries it computes for us (at step t+1, sent at step t)
    help_kinds = [(kind, x) for kind, x in (("q", q), ("dout", dout), ("out", out), ("lse", lse),
                                            ("dlse", dlse), ("q_doc", doc)) if x is not None]

    def receive_home_and_dq(step: int) -> list[Transfer]:
        """Receives of what was sent at the end of ``step``: our block's dK/dV coming home
        and dQ from a helper. Buffers are allocated here, when the message is due."""
        nonlocal home_buf
        transfers = []
        if plan.path_end[r] != r and step == own_last:
            home_buf = (empty_wire(k.shape, acc, q.device), empty_wire(v.shape, acc, q.device))
            transfers += [Transfer(False, home_buf[0], plan.path_end[r], "home_dk", step),
                          Transfer(False, home_buf[1], plan.path_end[r], "home_dv", step)]
        if step in helper_of:
            dq_results.append(empty_wire(q.shape, acc, q.device))
            transfers.append(Transfer(False, dq_results[-1], helper_of[step], "res_dq", step))
        return transfers

    for t, steps in enumerate(plan.steps):
        st = steps[r]
        # 1. Receive what was sent at the end of step t-1: accumulator of the block held now,
        #    the own block's accumulator coming home, dQ from a helper.
        late, acc_in = [], None
        if t > 0 and steps[r].holds is not None and steps[r].holds != r:
            acc_in = (empty_wire(k.shape, acc, q.device), empty_wire(v.shape, acc, q.device))
            late += [Transfer(False, acc_in[0], comm.prev, "acc_dk", t - 1),
                     Transfer(False, acc_in[1], comm.prev, "acc_dv", t - 1)]
        if t > 0:
            late += receive_home_and_dq(t - 1)
        late_pending = comm.post(late, f"dK/dV accumulators and dQ results of step {t - 1}")
        # 2. Prefetch the next step's KV block and help bundle.
        transfers, nxt = _kv_prefetch(st, held, (k, v, doc, kvalid), comm, t)
        nxt_help = None
        if st.q_to is not None:
            bundle = bundle or [(kind, to_wire_layout(x)) for kind, x in help_kinds]
            transfers += [Transfer(True, x, st.q_to, kind, t) for kind, x in bundle]
        if st.q_from is not None:
            nxt_help = {kind: empty_wire_like(x) for kind, x in help_kinds}
            transfers += [Transfer(False, x, st.q_from, kind, t) for kind, x in nxt_help.items()]
        pending = comm.post(transfers, f"the KV block for step {t + 1} (backward)")
        if not cfg.overlap:
            pending.wait()
        # 3. Own block: dQ locally, dK/dV into the travelling accumulator.
        if st.holds is not None:
            hk, hv, hdoc, hvalid = held
            # accumulate straight into the incoming accumulator (one pair of KV-sized fp32
            # buffers per step less); it was sent at the end of step t-1, so it is (nearly) here
            late_pending.wait()
            dk_b = _Accumulator(k.shape, acc, q.device, None if acc_in is None else acc_in[0])
            dv_b = _Accumulator(v.shape, acc, q.device, None if acc_in is None else acc_in[1])
            if st.compute_own:
                _attend_backward(dout, q, out, lse, L.segs(r), doc, hk, hv, hdoc, hvalid, L.segs(st.holds), cfg,
                                 dq, dk_b, dv_b, dlse)
            if st.forward_kv:
                L.send(t, comm.post([Transfer(True, dk_b.tensor(), comm.next, "acc_dk", t),
                                     Transfer(True, dv_b.tensor(), comm.next, "acc_dv", t)], "forwarding dK/dV"))
            elif st.holds != r:
                L.send(t, comm.post([Transfer(True, dk_b.tensor(), st.holds, "home_dk", t),
                                     Transfer(True, dv_b.tensor(), st.holds, "home_dv", t)], "sending dK/dV home"))
            elif dk_b.value is not None:
                home_dk.add_(slice(0, k.shape[2]), dk_b.value)
                home_dv.add_(slice(0, v.shape[2]), dv_b.value)
            del dk_b, dv_b, acc_in
        else:
            late_done.append(late_pending)
        # 4. Help task: gradients of another rank's queries against our own KV.
        if st.help_q is not None:
            f = help_in
            f_dq = _Accumulator(f["q"].shape, acc, q.device)
            _attend_backward(f["dout"], f["q"], f["out"], f["lse"], L.segs(st.help_q), f.get("q_doc"), k, v,
                             doc, kvalid, L.segs(r), cfg, f_dq, home_dk, home_dv, f.get("dlse"))
            L.send(t, comm.post([Transfer(True, f_dq.tensor(), st.help_q, "res_dq", t)], "sending dQ results"))
        pending.wait()
        L.release(t)
        held, help_in = nxt, nxt_help
    late_done.append(comm.post(receive_home_and_dq(plan.num_steps - 1), "the last dK/dV and dQ results"))
    for p in late_done:
        p.wait()
    if home_buf is not None:
        home_dk.add_(slice(0, k.shape[2]), home_buf[0])
        home_dv.add_(slice(0, v.shape[2]), home_buf[1])
        home_buf = None
    for buf in dq_results:
        dq.add_(slice(0, q.shape[2]), buf)
    L.finish()
    return dq.tensor().to(q.dtype), home_dk.tensor().to(k.dtype), home_dv.tensor().to(v.dtype)
