"""Triton flash-attention kernels for one attention block: forward → (out, lse), and backward.

The ring op (docs/architecture.md) reaches these through ``block_attention_forward`` /
``block_attention_backward`` on CUDA tensors. On CPU tensors they run under the Triton
interpreter (``TRITON_INTERPRET=1`` set before this module is imported: ``triton.jit`` decides
interpreted vs compiled when it decorates), which is how the test suite checks them here.

The mask is never materialised. Every program evaluates the ``BlockMask`` itself from scalars
(affine global positions ``start + row * stride``, the band ``-behind <= k - q <= ahead``) and,
for packed documents and key padding, from the per-row vectors (ids, key validity), and it
loops only over the tiles that positions allow, so the key tiles of a causal or windowed block
that no row can see are never loaded; a tile that documents or padding leave empty is skipped.

Forward, one program per (query tile, batch·query head): online softmax over key tiles in
base 2 (``exp2`` is the hardware instruction; ``exp(x) = exp2(x·log2 e)``), the lse converted
back to natural log when stored.

Backward, atomic-free (the FlashAttention-2 split, as in Triton's tutorial 06):
  1. preprocess: ``delta = rowsum(dO·O)`` and the lse in base 2; a dead row (lse = -inf, it
     sees no key anywhere) becomes +inf so that ``p = exp2(s - lse) = 0`` whatever ``s`` is;
  2. dk/dv: one program per (key tile, batch·kv head) owns its dk, dv rows and loops over the
     G query heads of its group and the query tiles that can see its keys;
  3. dq: one program per (query tile, batch·query head) owns its dq rows and loops over keys.

Score semantics, evaluated per tile from positions like the mask: soft-capping
``s ← cap · tanh(s / cap)`` (tanh as ``2·sigmoid(2x) − 1``; the backward multiplies dS by
``1 − tanh²``), then ALiBi ``s += slopes[h] · (k_pos − q_pos)`` (one slope per program's head).
Dv ≠ D is zero-padded on the host to one head width (exact: zero value columns give zero output
columns, zero q/k columns add nothing to q·k).

Shape legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv (query head h reads
kv head h // G: K/V are never repeated), M query rows, N key rows, D head dim (≤ 256),
D_PAD = max(16, next power of two ≥ D) (tl.arange and tl.dot need powers of two ≥ 16; the
extra columns are masked loads of zeros), BLOCK_M / BLOCK_N query / key rows of one tile.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import torch
import triton
import triton.language as tl

from .block_mask import BlockMask
from .triton_configs import TritonConfigs, triton_configs

__all__ = ["triton_block_forward", "triton_block_backward", "TRITON_DTYPES", "SCORE_MODS"]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# What these kernels compute beyond ATen's cuDNN/FA2 kernels: score semantics and per-key
# visibility (``cuda_dispatch`` reads it).
SCORE_MODS = ("alibi", "softcap", "dv", "key_padding")

_LOG2E = math.log2(math.e)           # exp(x) = exp2(x * log2 e): scales fold into one multiply
_LOG2E_TL = tl.constexpr(_LOG2E)
_LN2_TL = tl.constexpr(math.log(2.0))


# ----------------------------------------------------------------------------- mask helpers


@triton.jit
def _visible(q_pos, k_pos, q_doc, k_doc, q_ok, k_ok, ahead, behind,
             HAS_AHEAD: tl.constexpr, HAS_BEHIND: tl.constexpr, HAS_DOCS: tl.constexpr):
    """BlockMask visibility of a tile; arguments come broadcast to the tile's shape, in either
    orientation ([BLOCK_M, BLOCK_N] forward/dq, [BLOCK_N, BLOCK_M] dk/dv). ``k_ok`` is False
    past the block's last key and, with key padding, on invalid keys."""
    vis = q_ok & k_ok
    if HAS_AHEAD:
        vis = vis & (k_pos - q_pos <= ahead)
    if HAS_BEHIND:
        vis = vis & (q_pos - k_pos <= behind)
    if HAS_DOCS:
        vis = vis & (q_doc == k_doc)
    return vis


@triton.jit
def _scores2(raw, kq_diff, slope2, scale, scale2, cap, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Scores in base 2 from the raw q·k of a tile (either orientation) and, with a softcap,
    ``tanh(scale · raw / cap)`` for the backward (else ``raw``, unused). ``kq_diff`` is
    k_pos − q_pos broadcast to the tile; ``slope2`` = slope · log2 e."""
    t = raw
    if HAS_SOFTCAP:
        t = 2.0 * tl.sigmoid(raw * (2.0 * scale / cap)) - 1.0
        s = t * (cap * _LOG2E_TL)
    else:
        s = raw * scale2
    if HAS_ALIBI:
        s = s + kq_diff.to(tl.float32) * slope2
    return s, t


@triton.jit
def _key_rows_seen(q_first, q_last, k_start, k_stride, N, ahead, behind,
                   HAS_AHEAD: tl.constexpr, HAS_BEHIND: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the key rows that queries at positions q_first..q_last can see by position.

    Numerators are tested for sign before dividing: integer division truncates on the GPU but
    floors in the interpreter, and the two agree only on non-negative numbers.
    """
    hi = N
    if HAS_AHEAD:                                    # last key with k_pos <= q_last + ahead
        num = q_last + ahead - k_start
        hi = tl.minimum(tl.where(num >= 0, num // k_stride + 1, 0), N)
    lo = 0
    if HAS_BEHIND:                                   # first key with k_pos >= q_first - behind
        num = q_first - behind - 1 - k_start
        lo = tl.minimum(tl.where(num >= 0, num // k_stride + 1, 0), N)
        lo = lo // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _query_rows_seeing(k_first, k_last, q_start, q_stride, M, ahead, behind,
                       HAS_AHEAD: tl.constexpr, HAS_BEHIND: tl.constexpr, BLOCK_M: tl.constexpr):
    """[lo, hi) of the query rows that can see some key at positions k_first..k_last."""
    lo = 0
    if HAS_AHEAD:                                    # first query with q_pos >= k_first - ahead
        num = k_first - ahead - q_start
        lo = tl.minimum(tl.where(num > 0, (num + q_stride - 1) // q_stride, 0), M)
        lo = lo // BLOCK_M * BLOCK_M
    hi = M
    if HAS_BEHIND:                                   # last query with q_pos <= k_last + behind
        num = k_last + behind - q_start
        hi = tl.minimum(tl.where(num >= 0, num // q_stride + 1, 0), M)
    return lo, hi


# ----------------------------------------------------------------------------- forward


@triton.jit
def _live_keys(kvalid_base, cols, n_ok, HAS_PAD: tl.constexpr):
    """Keys of a tile that exist (below N) and, with key padding, are valid."""
    if HAS_PAD:
        return n_ok & (tl.load(kvalid_base + cols, mask=n_ok, other=0) != 0)
    return n_ok


@triton.jit
def _load_key_tile(k_base, v_base, kdoc_base, kvalid_base, n0, offs_n, offs_d, d_ok, sk_n, sv_n, N, k_start,
                   k_stride, q_pos, q_doc, m_ok, ahead, behind, BLOCK_N: tl.constexpr, HAS_AHEAD: tl.constexpr,
                   HAS_BEHIND: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_PAD: tl.constexpr):
    """K and V rows [n0, n0 + BLOCK_N) (masked past N and past the head dim) and the
    visibility of this query tile against them: [BLOCK_N, D_PAD] ×2, [BLOCK_M, BLOCK_N]."""
    cols = n0 + offs_n
    cols64 = cols.to(tl.int64)
    n_ok = cols < N
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + cols64[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols64[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)
    k_doc = tl.zeros([BLOCK_N], dtype=tl.int32)
    if HAS_DOCS:
        k_doc = tl.load(kdoc_base + cols, mask=n_ok, other=0)
    k_live = _live_keys(kvalid_base, cols, n_ok, HAS_PAD)
    vis = _visible(q_pos[:, None], (k_start + cols * k_stride)[None, :], q_doc[:, None],
                   k_doc[None, :], m_ok[:, None], k_live[None, :], ahead, behind,
                   HAS_AHEAD, HAS_BEHIND, HAS_DOCS)
    return k, v, vis


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k, v, vis, kq_diff, slope2, scale, scale2, cap, PRECISION: tl.constexpr,
              HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """One online-softmax step (base 2). ``m_safe`` keeps rows with no visible key so far
    at m = -inf without computing exp2(-inf - -inf) = NaN."""
    raw = tl.dot(q, tl.trans(k), input_precision=PRECISION)                 # [BLOCK_M, BLOCK_N]
    s, _ = _scores2(raw, kq_diff, slope2, scale, scale2, cap, HAS_ALIBI, HAS_SOFTCAP)
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, QDoc, KDoc, Slopes, KValid,
                sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m, sqd_b, skd_b, skv_b,
                M, N, D, Hq, G, scale, scale2, cap, q_start, q_stride, k_start, k_stride, ahead, behind,
                HAS_AHEAD: tl.constexpr, HAS_BEHIND: tl.constexpr, HAS_DOCS: tl.constexpr,
                HAS_PAD: tl.constexpr, PER_TOKEN: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                D_PAD: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)   # row × stride can pass 2**31 on long shards
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    m_ok = rows < M
    d_ok = offs_d < D
    q = tl.load(Q + b * sq_b + h * sq_h + rows64[:, None] * sq_m + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)                 # [BLOCK_M, D_PAD]
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    q_pos = q_start + rows * q_stride
    q_doc = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_DOCS:
        q_doc = tl.load(QDoc + b * sqd_b + rows, mask=m_ok, other=0)

    m0 = pid_m * BLOCK_M
    m_last = tl.minimum(m0 + BLOCK_M, M) - 1
    lo, hi = _key_rows_seen(q_start + m0 * q_stride, q_start + m_last * q_stride, k_start, k_stride,
                            N, ahead, behind, HAS_AHEAD, HAS_BEHIND, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + h).to(tl.float32) * _LOG2E_TL
    for n0 in range(lo, hi, BLOCK_N):
        k, v, vis = _load_key_tile(k_base, v_base, KDoc + b * skd_b, KValid + b * skv_b, n0, offs_n, offs_d,
                                   d_ok, sk_n, sv_n, N, k_start, k_stride, q_pos, q_doc, m_ok, ahead, behind,
                                   BLOCK_N, HAS_AHEAD, HAS_BEHIND, HAS_DOCS, HAS_PAD)
        kq_diff = (k_start + (n0 + offs_n) * k_stride)[None, :] - q_pos[:, None]
        if PER_TOKEN:   # positions already bound the loop; documents or padding can still empty a tile
            if tl.max(vis.to(tl.int32)) > 0:
                acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k, v, vis, kq_diff, slope2, scale, scale2, cap,
                                          PRECISION, HAS_ALIBI, HAS_SOFTCAP)
        else:
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k, v, vis, kq_diff, slope2, scale, scale2, cap,
                                      PRECISION, HAS_ALIBI, HAS_SOFTCAP)

    dead = l_i == 0.0                                # saw no key: out = 0, lse = -inf
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2_TL)
    tl.store(Out + b * so_b + h * so_h + rows64[:, None] * so_m + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + pid_bh.to(tl.int64) * M + rows, lse, mask=m_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_preprocess_kernel(Out, DOut, Lse, Delta, Lse2, so_b, so_h, so_m, sdo_b, sdo_h, sdo_m,
                           M, D, Hq, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    m_ok = rows < M
    tile_mask = m_ok[:, None] & (offs_d < D)[None, :]
    o = tl.load(Out + b * so_b + h * so_h + rows64[:, None] * so_m + offs_d[None, :],
                mask=tile_mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + b * sdo_b + h * sdo_h + rows64[:, None] * sdo_m + offs_d[None, :],
                 mask=tile_mask, other=0.0).to(tl.float32)
    row_base = pid_bh.to(tl.int64) * M
    lse = tl.load(Lse + row_base + rows, mask=m_ok, other=0.0)
    tl.store(Delta + row_base + rows, tl.sum(o * do, 1), mask=m_ok)
    tl.store(Lse2 + row_base + rows, tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E_TL),
             mask=m_ok)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q, do, lse2, delta, vis_t, kq_diff_t, slope2, scale, scale2, cap,
               PRECISION: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Transposed ([BLOCK_N, BLOCK_M]) probabilities of one query tile → dk, dv updates
    (dk still lacks the softmax scale, applied once at the end)."""
    raw_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
    s_t, t_t = _scores2(raw_t, kq_diff_t, slope2, scale, scale2, cap, HAS_ALIBI, HAS_SOFTCAP)
    p_t = tl.where(vis_t, tl.exp2(s_t - lse2[None, :]), 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if HAS_SOFTCAP:
        ds_t = ds_t * (1.0 - t_t * t_t)
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DOut, Lse2, Delta, DK, DV, QDoc, KDoc, Slopes, KValid,
                     sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_m,
                     sqd_b, skd_b, skv_b, M, N, D, Hq, Hkv, G, scale, scale2, cap,
                     q_start, q_stride, k_start, k_stride, ahead, behind,
                     HAS_AHEAD: tl.constexpr, HAS_BEHIND: tl.constexpr, HAS_DOCS: tl.constexpr,
                     HAS_PAD: tl.constexpr, PER_TOKEN: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     D_PAD: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols64 = cols.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    n_ok = cols < N
    d_ok = offs_d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * sk_b + hk * sk_h + cols64[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * sv_b + hk * sv_h + cols64[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)
    k_pos = k_start + cols * k_stride
    k_doc = tl.zeros([BLOCK_N], dtype=tl.int32)
    if HAS_DOCS:
        k_doc = tl.load(KDoc + b * skd_b + cols, mask=n_ok, other=0)
    k_live = _live_keys(KValid + b * skv_b, cols, n_ok, HAS_PAD)

    n0 = pid_n * BLOCK_N
    n_last = tl.minimum(n0 + BLOCK_N, N) - 1
    lo, hi = _query_rows_seeing(k_start + n0 * k_stride, k_start + n_last * k_stride, q_start, q_stride,
                                M, ahead, behind, HAS_AHEAD, HAS_BEHIND, BLOCK_M)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    for g in range(G):                               # the query heads that read this kv head
        h = hk * G + g
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(Slopes + h).to(tl.float32) * _LOG2E_TL
        q_base = Q + b * sq_b + h * sq_h
        do_base = DOut + b * sdo_b + h * sdo_h
        row_base = (b * Hq + h) * M
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + offs_m
            rows64 = rows.to(tl.int64)
            m_ok = rows < M
            q_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows64[:, None] * sq_m + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + rows64[:, None] * sdo_m + offs_d[None, :], mask=q_mask, other=0.0)
            lse2 = tl.load(Lse2 + row_base + rows, mask=m_ok, other=float("inf"))
            delta = tl.load(Delta + row_base + rows, mask=m_ok, other=0.0)
            q_doc = tl.zeros([BLOCK_M], dtype=tl.int32)
            if HAS_DOCS:
                q_doc = tl.load(QDoc + b * sqd_b + rows, mask=m_ok, other=0)
            vis_t = _visible((q_start + rows * q_stride)[None, :], k_pos[:, None], q_doc[None, :],
                             k_doc[:, None], m_ok[None, :], k_live[:, None], ahead, behind,
                             HAS_AHEAD, HAS_BEHIND, HAS_DOCS)
            kq_diff_t = k_pos[:, None] - (q_start + rows * q_stride)[None, :]
            if PER_TOKEN:
                if tl.max(vis_t.to(tl.int32)) > 0:
                    dk, dv = _dkdv_tile(dk, dv, k, v, q, do, lse2, delta, vis_t, kq_diff_t, slope2, scale, scale2,
                                        cap, PRECISION, HAS_ALIBI, HAS_SOFTCAP)
            else:
                dk, dv = _dkdv_tile(dk, dv, k, v, q, do, lse2, delta, vis_t, kq_diff_t, slope2, scale, scale2,
                                    cap, PRECISION, HAS_ALIBI, HAS_SOFTCAP)

    out_offs = pid_bh.to(tl.int64) * N * D + cols[:, None] * D + offs_d[None, :]   # contiguous
    tl.store(DK + out_offs, dk * scale, mask=kv_mask)
    tl.store(DV + out_offs, dv, mask=kv_mask)


@triton.jit
def _dq_tile(dq, q, do, k, v, lse2, delta, vis, kq_diff, slope2, scale, scale2, cap, PRECISION: tl.constexpr,
             HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """One key tile's contribution to dq (without the softmax scale)."""
    raw = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    s, t = _scores2(raw, kq_diff, slope2, scale, scale2, cap, HAS_ALIBI, HAS_SOFTCAP)
    p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DOut, Lse2, Delta, DQ, QDoc, KDoc, Slopes, KValid,
                   sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_m,
                   sqd_b, skd_b, skv_b, M, N, D, Hq, G, scale, scale2, cap,
                   q_start, q_stride, k_start, k_stride, ahead, behind,
                   HAS_AHEAD: tl.constexpr, HAS_BEHIND: tl.constexpr, HAS_DOCS: tl.constexpr,
                   HAS_PAD: tl.constexpr, PER_TOKEN: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   D_PAD: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    m_ok = rows < M
    d_ok = offs_d < D
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + rows64[:, None] * sq_m + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DOut + b * sdo_b + h * sdo_h + rows64[:, None] * sdo_m + offs_d[None, :],
                 mask=q_mask, other=0.0)
    row_base = pid_bh.to(tl.int64) * M
    lse2 = tl.load(Lse2 + row_base + rows, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + row_base + rows, mask=m_ok, other=0.0)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    q_pos = q_start + rows * q_stride
    q_doc = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_DOCS:
        q_doc = tl.load(QDoc + b * sqd_b + rows, mask=m_ok, other=0)

    m0 = pid_m * BLOCK_M
    m_last = tl.minimum(m0 + BLOCK_M, M) - 1
    lo, hi = _key_rows_seen(q_start + m0 * q_stride, q_start + m_last * q_stride, k_start, k_stride,
                            N, ahead, behind, HAS_AHEAD, HAS_BEHIND, BLOCK_N)
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + h).to(tl.float32) * _LOG2E_TL
    for n0 in range(lo, hi, BLOCK_N):
        k, v, vis = _load_key_tile(k_base, v_base, KDoc + b * skd_b, KValid + b * skv_b, n0, offs_n, offs_d,
                                   d_ok, sk_n, sv_n, N, k_start, k_stride, q_pos, q_doc, m_ok, ahead, behind,
                                   BLOCK_N, HAS_AHEAD, HAS_BEHIND, HAS_DOCS, HAS_PAD)
        kq_diff = (k_start + (n0 + offs_n) * k_stride)[None, :] - q_pos[:, None]
        if PER_TOKEN:
            if tl.max(vis.to(tl.int32)) > 0:
                dq = _dq_tile(dq, q, do, k, v, lse2, delta, vis, kq_diff, slope2, scale, scale2, cap, PRECISION,
                              HAS_ALIBI, HAS_SOFTCAP)
        else:
            dq = _dq_tile(dq, q, do, k, v, lse2, delta, vis, kq_diff, slope2, scale, scale2, cap, PRECISION,
                          HAS_ALIBI, HAS_SOFTCAP)

    tl.store(DQ + row_base * D + rows[:, None] * D + offs_d[None, :], dq * scale, mask=q_mask)


# ----------------------------------------------------------------------------- host side


def _launch_configs(d_pad: int, dtype: torch.dtype, device: torch.device, block_m: int | None,
                    block_n: int | None) -> TritonConfigs:
    """The per-pass configs (``triton_configs.py``: a deterministic table per GPU, D and dtype);
    explicit ``block_m`` / ``block_n`` (tests) override the tiles of every pass."""
    cfg = triton_configs(d_pad, dtype, device)
    if block_m is None and block_n is None:
        return cfg
    fix = lambda c: replace(c, block_m=block_m or c.block_m, block_n=block_n or c.block_n)  # noqa: E731
    return TritonConfigs(fix(cfg.forward), fix(cfg.dkdv), fix(cfg.dq))


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device; the ring may hold tensors on another one.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/head/row strides but need the head dim contiguous."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dtype not in TRITON_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"triton attention takes q, k, v of one dtype in {TRITON_DTYPES}; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"expected q [B,Hq,M,D], k/v [B,Hkv,N,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    if q.shape[-1] > 256:
        raise ValueError(f"triton attention supports head dims up to 256; got {q.shape[-1]}")


def _mask_args(mask: BlockMask, q: torch.Tensor, B: int, M: int, N: int) -> dict:
    """Kernel arguments for the mask: scalars, constexpr flags and the per-token vectors
    (document ids, key validity as int8; a [1, L] vector broadcasts over the batch with batch
    stride 0)."""
    spec, has_docs, has_pad = mask.spec, mask.has_docs, mask.has_padding
    if has_docs:
        q_doc = mask.q_doc.to(q.device, torch.int64).contiguous().expand(B, M)
        k_doc = mask.k_doc.to(q.device, torch.int64).contiguous().expand(B, N)
    else:
        q_doc = k_doc = torch.zeros(1, dtype=torch.int64, device=q.device)   # never read
    k_valid = (mask.k_valid.to(q.device, torch.int8).contiguous().expand(B, N) if has_pad
               else torch.zeros(1, dtype=torch.int8, device=q.device))      # never read without padding
    has_alibi, has_softcap = mask.alibi_slopes is not None, mask.softcap is not None
    slopes = (mask.alibi_slopes.to(q.device, torch.float32).contiguous() if has_alibi
              else torch.zeros(1, dtype=torch.float32, device=q.device))    # never read without ALiBi
    return dict(
        docs=(q_doc, k_doc, slopes, k_valid),
        cap=float(mask.softcap) if has_softcap else 1.0,
        doc_strides=(q_doc.stride(0) if has_docs else 0, k_doc.stride(0) if has_docs else 0,
                     k_valid.stride(0) if has_pad else 0),
        scalars=(mask.q_start, mask.q_stride, mask.k_start, mask.k_stride, spec.ahead or 0, spec.behind or 0),
        flags=dict(HAS_AHEAD=spec.ahead is not None, HAS_BEHIND=spec.behind is not None, HAS_DOCS=has_docs,
                   HAS_PAD=has_pad, PER_TOKEN=has_docs or has_pad,
                   # fp32 stays fp32 on a GPU too (no TF32); fp16/bf16 take the backend default
                   PRECISION="ieee" if q.dtype == torch.float32 else None,
                   HAS_ALIBI=has_alibi, HAS_SOFTCAP=has_softcap),
    )


def _pad_head_dims(*xs_and_widths) -> list[torch.Tensor]:
    """Each tensor zero-padded on its last dim to the given width (itself when already that wide)."""
    return [x if x.shape[-1] == w else torch.nn.functional.pad(x, (0, w - x.shape[-1])) for x, w in xs_and_widths]


def triton_block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask,
                         scale: float, *, block_m: int | None = None, block_n: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one block on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).

    Args:
        q: [B, Hq, M, D] queries, fp16/bf16/fp32.
        k, v: [B, Hkv, N, D] keys and values, q's dtype.
        mask: the block's global positions and mask kinds, evaluated inside the kernel.
        scale: softmax scale applied to q·k.
        block_m, block_n: tile sizes (powers of two ≥ 16); by default per GPU, D and dtype
            (``triton_configs.py``).

    Returns:
        out [B, Hq, M, D] in q's dtype, and lse [B, Hq, M] fp32 in natural log. A row that
        sees no key has out = 0, lse = -inf. With v [B, Hkv, N, Dv], out is [B, Hq, M, Dv].
    """
    D, Dv = q.shape[-1], v.shape[-1]
    if D != Dv:
        W = max(D, Dv)
        qp, kp, vp = _pad_head_dims((q, W), (k, W), (v, W))
        out, lse = triton_block_forward(qp, kp, vp, mask, scale, block_m=block_m, block_n=block_n)
        return out[..., :Dv], lse
    _check_inputs(q, k, v)
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if B * Hq * M == 0 or N == 0:
        return (q.new_zeros(B, Hq, M, D),
                torch.full((B, Hq, M), float("-inf"), dtype=torch.float32, device=q.device))
    out = torch.empty(B, Hq, M, D, dtype=q.dtype, device=q.device)     # every row is written
    lse = torch.empty(B, Hq, M, dtype=torch.float32, device=q.device)
    d_pad = max(16, triton.next_power_of_2(D))
    fwd = _launch_configs(d_pad, q.dtype, q.device, block_m, block_n).forward
    a = _mask_args(mask, q, B, M, N)
    with _device_guard(q.device):
        _fwd_kernel[(triton.cdiv(M, fwd.block_m), B * Hq)](
            q, k, v, out, lse, *a["docs"], *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *out.stride()[:3], *a["doc_strides"], M, N, D, Hq, Hq // Hkv, scale, scale * _LOG2E, a["cap"],
            *a["scalars"], **a["flags"], BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n, D_PAD=d_pad,
            num_warps=fwd.num_warps, num_stages=fwd.num_stages)
    return out, lse


def triton_block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, mask: BlockMask, scale: float, *,
                          block_m: int | None = None, block_n: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *merged* (out, lse) of the whole attention.

    With the global lse, ``exp(s - lse)`` is this block's share of the global softmax, so the
    per-block gradients sum (dq) or concatenate (dk, dv) to those of the whole attention.

    Args:
        dout: [B, Hq, M, D] gradient of the merged output (any float dtype).
        q, k, v, mask, scale: as in ``triton_block_forward``.
        out: [B, Hq, M, D] merged output; lse: [B, Hq, M] merged log-sum-exp (natural log;
            -inf marks a row that sees no key anywhere: it gets zero gradients).
        block_m, block_n: tile sizes, as in the forward.

    Returns:
        dq [B, Hq, M, D], dk [B, Hkv, N, D], dv [B, Hkv, N, D], all fp32 (dv [B, Hkv, N, Dv]
        with a v of head dim Dv, dout/out then [B, Hq, M, Dv]).
    """
    D, Dv = q.shape[-1], v.shape[-1]
    if D != Dv:
        W = max(D, Dv)
        padded = _pad_head_dims((dout, W), (q, W), (k, W), (v, W), (out, W))
        dq, dk, dv = triton_block_backward(*padded[:4], padded[4], lse, mask, scale, block_m=block_m,
                                           block_n=block_n)
        return dq[..., :D], dk[..., :D], dv[..., :Dv]
    _check_inputs(q, k, v)
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    dout, out = _rows_contiguous(dout.to(q.dtype)), _rows_contiguous(out)
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    empty = torch.zeros if B * Hq * M == 0 or N == 0 else torch.empty   # kernels write every row
    dq = empty(B, Hq, M, D, dtype=torch.float32, device=q.device)
    dk = empty(B, Hkv, N, D, dtype=torch.float32, device=q.device)
    dv = empty(B, Hkv, N, D, dtype=torch.float32, device=q.device)
    if B * Hq * M == 0 or N == 0:
        return dq, dk, dv
    d_pad = max(16, triton.next_power_of_2(D))
    cfg = _launch_configs(d_pad, q.dtype, q.device, block_m, block_n)
    a = _mask_args(mask, q, B, M, N)
    lse = lse.to(torch.float32).contiguous()
    delta = torch.empty_like(lse)
    lse2 = torch.empty_like(lse)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *a["doc_strides"])
    scale2 = scale * _LOG2E
    with _device_guard(q.device):
        _bwd_preprocess_kernel[(triton.cdiv(M, cfg.dq.block_m), B * Hq)](
            out, dout, lse, delta, lse2, *out.stride()[:3], *dout.stride()[:3], M, D, Hq,
            BLOCK_M=cfg.dq.block_m, D_PAD=d_pad, num_warps=cfg.dq.num_warps)
        _bwd_dkdv_kernel[(triton.cdiv(N, cfg.dkdv.block_n), B * Hkv)](
            q, k, v, dout, lse2, delta, dk, dv, *a["docs"], *strides, M, N, D, Hq, Hkv, Hq // Hkv,
            scale, scale2, a["cap"], *a["scalars"], **a["flags"], BLOCK_M=cfg.dkdv.block_m, BLOCK_N=cfg.dkdv.block_n,
            D_PAD=d_pad, num_warps=cfg.dkdv.num_warps, num_stages=cfg.dkdv.num_stages)
        _bwd_dq_kernel[(triton.cdiv(M, cfg.dq.block_m), B * Hq)](
            q, k, v, dout, lse2, delta, dq, *a["docs"], *strides, M, N, D, Hq, Hq // Hkv,
            scale, scale2, a["cap"], *a["scalars"], **a["flags"], BLOCK_M=cfg.dq.block_m, BLOCK_N=cfg.dq.block_n,
            D_PAD=d_pad, num_warps=cfg.dq.num_warps, num_stages=cfg.dq.num_stages)
    return dq, dk, dv
