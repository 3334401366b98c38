"""Block attention on CUDA through ATen's cuDNN and FlashAttention-2 kernels.

Both return the log-sum-exp a ring needs and have a backward that takes a saved (out, lse), so
a block can be computed by them and its gradients from the *merged* (out, lse) of the whole
attention, as torch's own context parallelism does (``torch/distributed/tensor/experimental/
_context_parallel/_attention.py``). They are 2-3.5× faster than our Triton kernels on an H200
(cuDNN 636, FA2 306, Triton 185 TFLOP/s, bf16 causal D=128 S=16k), but each computes
only some masks exactly, so a block is *planned* first (pure integer arithmetic on the
``BlockMask``, testable on CPU) and handed to them only when the plan reproduces its visibility:

  ``DenseCall``   one call on a sub-block [q0, q1) × [k0, k1): unmasked, causal (top-left
                  aligned, M' = N': cuDNN or FA2) or a sliding window (FA2's window_size_left /
                  right, bottom-right aligned). Rows outside [q0, q1) see no key: out 0, lse -inf.
  ``VarlenCall``  packed documents as FA2 varlen (``cum_seq_q/k``): each document's query run
                  paired with the same document's key run; a run with no partner pairs with an
                  empty one. Causal only on a diagonal block (the runs coincide).

fp16/bf16 only (both kernels), head dims that are multiples of 8 (cuDNN ≤ 128, FA2 ≤ 256).

Shape legend: B batch, Hq query heads, Hkv key/value heads, M query rows, N key rows, D head dim.
FA2 takes and returns [B, S, H, D] memory, which is the ring's wire layout: q.transpose(1, 2)
is a view. lse is [B, Hq, M] fp32, natural log; FA2 marks a row that sees no key with lse = +inf
and cuDNN with [B, Hq, M, 1]: both are brought to the contract (lse = -inf, out = 0) here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_mask import BlockMask, plan_tiles, visible_key_range

__all__ = ["CUDA_ATEN_DTYPES", "DenseCall", "VarlenCall", "plan_dense_call", "plan_varlen_call",
           "aten_cuda_forward", "aten_cuda_backward"]

CUDA_ATEN_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class DenseCall:
    """One kernel call on rows [q0, q1) and keys [k0, k1) of the block.

    ``window_left/right`` are FA2's (key j of the sub-block visible to row i iff
    i + c - left <= j <= i + c + right, c = (k1 - k0) - (q1 - q0)); None: unbounded.
    """

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool
    window_left: int | None = None
    window_right: int | None = None

    @property
    def windowed(self) -> bool:
        return self.window_left is not None or self.window_right is not None

    def covers(self, M: int, N: int) -> bool:
        return (self.q0, self.q1, self.k0, self.k1) == (0, M, 0, N)


@dataclass(frozen=True)
class VarlenCall:
    """FA2 varlen over the flattened [B·M] query and [B·N] key rows.

    ``cu_q`` / ``cu_k``: the cumulative run boundaries (the i-th query run attends to the i-th
    key run); ``q_alive`` [B, M] bool: rows whose run has a key partner (the others: out 0,
    lse -inf).
    """

    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]
    max_q: int
    max_k: int
    causal: bool
    q_alive: torch.Tensor


def _unit_strides(mask: BlockMask) -> bool:
    return mask.q_stride == 1 and mask.k_stride == 1


def _window_call(mask: BlockMask, M: int, N: int) -> DenseCall | None:
    """A band block as one FA2 call on the span of rows and keys it can see, if FA2's
    bottom-right-aligned window reproduces every row's visible range exactly."""
    if not _unit_strides(mask) or mask.per_token:
        return None
    lo, hi = visible_key_range(mask, M, N)
    alive = (hi > lo).nonzero().flatten()
    if alive.numel() == 0:
        return None
    q0, q1 = int(alive[0]), int(alive[-1]) + 1
    if q1 - q0 != alive.numel():
        return None
    k0, k1 = int(lo[q0:q1].min()), int(hi[q0:q1].max())
    d = (mask.q_start + q0) - (mask.k_start + k0)          # query row 0 sits d past key row 0
    c = (k1 - k0) - (q1 - q0)
    # key j visible to row i iff i + d - behind <= j <= i + d + ahead (sub-block coordinates);
    # FA2: i + c - left <= j <= i + c + right, None (unbounded) where the band is
    spec = mask.spec
    right = None if spec.ahead is None else d - c + spec.ahead
    left = None if spec.behind is None else c - d + spec.behind
    if (right is not None and right < 0) or (left is not None and left < 0):
        return None
    i = torch.arange(q1 - q0)
    fa_lo = (i + c - (left if left is not None else q1 + k1)).clamp(0, k1 - k0) + k0
    fa_hi = (i + c + (right if right is not None else q1 + k1) + 1).clamp(0, k1 - k0) + k0
    if not (torch.equal(fa_lo, lo[q0:q1]) and torch.equal(fa_hi, hi[q0:q1])):
        return None                                          # never a wrong answer: Triton does it
    return DenseCall(q0, q1, k0, k1, False, left, right)


def plan_dense_call(mask: BlockMask, M: int, N: int) -> DenseCall | None:
    """The one cuDNN/FA2 call that computes this block exactly, or None (no per-token data).

    Unmasked and causal blocks (after dropping rows that see nothing, as in a striped block
    whose keys start one step later) come from ``plan_tiles``; bands from FA2's window sizes.
    """
    if mask.per_token:
        return None
    tiles = plan_tiles(mask, M, N, max(M, 1))
    if len(tiles) == 1 and tiles[0].mode != "dense":
        t = tiles[0]
        return DenseCall(t.q0, t.q1, t.k0, t.k1, t.mode == "causal")
    if mask.positional:
        return _window_call(mask, M, N)
    return None


def _runs(ids: list[int]) -> list[tuple[int, int, int]] | None:
    """(id, start, end) of the runs of equal ids; None if an id comes back after another
    (the documents are not contiguous) or ids are not increasing (no order to pair runs by)."""
    runs: list[tuple[int, int, int]] = []
    for i, x in enumerate(ids):
        if runs and runs[-1][0] == x:
            runs[-1] = (x, runs[-1][1], i + 1)
        elif runs and x < runs[-1][0]:
            return None
        else:
            runs.append((x, i, i + 1))
    return runs


def plan_varlen_call(mask: BlockMask, B: int, M: int, N: int) -> VarlenCall | None:
    """Packed documents as one FA2 varlen call, or None.

    Exact when positions do not cut inside a document pair: either every key of the block
    precedes every query (or no positional mask: non-causal), or the block is on the diagonal
    (same positions for queries and keys, so each pair is a square causal block). A window
    and documents together (a conjunction) go to Triton.
    """
    if not mask.has_docs or mask.has_padding or not _unit_strides(mask) or (
            mask.positional and not mask.causal) or mask.window is not None:
        return None
    lo, hi = visible_key_range(mask, M, N)
    positional_full = bool((lo == 0).all()) and bool((hi == N).all())
    diagonal = mask.causal and mask.q_start == mask.k_start and M == N
    if mask.positional and not (positional_full or diagonal):
        return None
    causal = mask.positional and not positional_full
    # one small device-to-host copy of the ids ([B or 1, M]); a [1, L] id vector broadcasts
    q_doc = mask.q_doc.to("cpu", torch.int64).expand(B, M)
    k_doc = mask.k_doc.to("cpu", torch.int64).expand(B, N)
    cu_q, cu_k = [0], [0]
    q_alive = torch.zeros(B, M, dtype=torch.bool)
    for b in range(B):
        q_runs, k_runs = _runs(q_doc[b].tolist()), _runs(k_doc[b].tolist())
        if q_runs is None or k_runs is None:
            return None
        keys = {x: (s, e) for x, s, e in k_runs}
        queries = {x: (s, e) for x, s, e in q_runs}
        for x in sorted(set(keys) | set(queries)):
            qs, qe = queries.get(x, (0, 0))
            ks, ke = keys.get(x, (0, 0))
            if causal and (qs, qe) != (ks, ke):
                return None
            cu_q.append(cu_q[-1] + qe - qs)
            cu_k.append(cu_k[-1] + ke - ks)
            if ke > ks:
                q_alive[b, qs:qe] = True
    max_q = max(b - a for a, b in zip(cu_q, cu_q[1:]))
    max_k = max(b - a for a, b in zip(cu_k, cu_k[1:]))
    return VarlenCall(tuple(cu_q), tuple(cu_k), max_q, max_k, causal, q_alive)


# ----------------------------------------------------------------------------- the ATen calls
# Each is a small function so that CPU tests can stand in for the CUDA kernels with a math
# model of the same semantics (tests/kernels/test_cuda_dispatch.py).


def _cudnn_forward(q, k, v, causal: bool, scale: float):
    """q/k/v [B, H, M|N, D] → out [B, H, M, D], lse [B, H, M]."""
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out, lse.reshape(lse.shape[:3])


def _cudnn_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """→ dq, dk, dv in the inputs' dtype. ``lse`` [B, H, M] is the merged one."""
    empty = q.new_empty(0)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.unsqueeze(-1).contiguous(), empty, empty, None, empty, empty,
        q.shape[2], k.shape[2], 0.0, causal, scale=scale)


def _flash_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float,
                   left: int | None, right: int | None):
    """q [B, M, Hq, D] (or [total_q, Hq, D] with cu_q), k/v [B, N, Hkv, D] (or [total_k, ...])
    → out like q, lse [B, Hq, M] (or [Hq, total_q]); +inf where a row sees no key."""
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale,
        window_size_left=left, window_size_right=right)
    return out, lse


def _flash_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float,
                    left: int | None, right: int | None):
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)     # dropout is 0: never read
    return torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, rng_state, q.new_empty(0),
        scale=scale, window_size_left=left, window_size_right=right)


# ----------------------------------------------------------------------------- block interface


def _bshd(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] → the [B, S, H, D] view FA2 reads (a view in the wire layout)."""
    x = x.transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()


def _dense_forward(kernel: str, q, k, v, call: DenseCall, scale: float):
    qs, ks, vs = q[:, :, call.q0:call.q1], k[:, :, call.k0:call.k1], v[:, :, call.k0:call.k1]
    if kernel == "cudnn":
        return _cudnn_forward(qs, ks, vs, call.causal, scale)
    M, N = qs.shape[2], ks.shape[2]
    out, lse = _flash_forward(_bshd(qs), _bshd(ks), _bshd(vs), None, None, M, N, call.causal, scale,
                              call.window_left, call.window_right)
    return out.transpose(1, 2), lse[..., :M]


def _varlen_forward(q, k, v, call: VarlenCall, scale: float):
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    cu_q = torch.tensor(call.cu_q, dtype=torch.int32, device=q.device)
    cu_k = torch.tensor(call.cu_k, dtype=torch.int32, device=q.device)
    flat = lambda x, S, H: _bshd(x).reshape(B * S, H, x.shape[-1])   # noqa: E731
    out, lse = _flash_forward(flat(q, M, Hq), flat(k, N, Hkv), flat(v, N, Hkv), cu_q, cu_k, call.max_q,
                              call.max_k, call.causal, scale, None, None)
    out = out.reshape(B, M, Hq, -1).transpose(1, 2)
    lse = lse.reshape(Hq, B, M).permute(1, 0, 2)
    alive = call.q_alive.to(q.device)[:, None, :]
    return out * alive[..., None].to(out.dtype), lse.masked_fill(~alive, float("-inf"))


def aten_cuda_forward(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      call: DenseCall | VarlenCall, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One block on ``kernel`` (``cudnn`` or ``flash``) following its plan.

    q [B,Hq,M,D], k/v [B,Hkv,N,D] → out [B,Hq,M,D] (q's dtype), lse [B,Hq,M] fp32 (-inf and
    out 0 for a row that sees no key).
    """
    B, Hq, M, D = q.shape
    N = k.shape[2]
    if isinstance(call, VarlenCall):
        return _varlen_forward(q, k, v, call, scale)
    out_s, lse_s = _dense_forward(kernel, q, k, v, call, scale)
    lse_s = lse_s.float().masked_fill(torch.isposinf(lse_s), float("-inf"))
    if call.covers(M, N):
        return out_s, lse_s
    out = q.new_zeros(B, M, Hq, D).transpose(1, 2)
    lse = torch.full((B, Hq, M), float("-inf"), dtype=torch.float32, device=q.device)
    out[:, :, call.q0:call.q1] = out_s
    lse[:, :, call.q0:call.q1] = lse_s
    return out, lse


def _backward_lse(lse: torch.Tensor) -> torch.Tensor:
    """Rows dead everywhere have merged lse = -inf; exp(s - lse) must be 0 for them, not NaN."""
    return lse.float().masked_fill(torch.isneginf(lse), float("inf")).contiguous()


def _varlen_backward(dout, q, k, v, out, lse, call: VarlenCall, scale: float):
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    cu_q = torch.tensor(call.cu_q, dtype=torch.int32, device=q.device)
    cu_k = torch.tensor(call.cu_k, dtype=torch.int32, device=q.device)
    flat = lambda x, S, H: _bshd(x).reshape(B * S, H, x.shape[-1])   # noqa: E731
    lse_flat = _backward_lse(lse).permute(1, 0, 2).reshape(Hq, B * M).contiguous()
    dq, dk, dv = _flash_backward(flat(dout, M, Hq), flat(q, M, Hq), flat(k, N, Hkv), flat(v, N, Hkv),
                                 flat(out, M, Hq), lse_flat, cu_q, cu_k, call.max_q, call.max_k, call.causal,
                                 scale, None, None)
    return (dq.reshape(B, M, Hq, -1).transpose(1, 2).float(), dk.reshape(B, N, Hkv, -1).transpose(1, 2).float(),
            dv.reshape(B, N, Hkv, -1).transpose(1, 2).float())


def aten_cuda_backward(kernel: str, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, call: DenseCall | VarlenCall,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *merged* (out, lse), on the kernel its forward used.

    Returns fp32 dq [B,Hq,M,D], dk/dv [B,Hkv,N,D].
    """
    dout, out = dout.to(q.dtype), out.to(q.dtype)
    if isinstance(call, VarlenCall):
        return _varlen_backward(dout, q, k, v, out, lse, call, scale)
    M, N = q.shape[2], k.shape[2]
    rows, keys = slice(call.q0, call.q1), slice(call.k0, call.k1)
    qs, ks, vs = q[:, :, rows], k[:, :, keys], v[:, :, keys]
    ds, os_, ls = dout[:, :, rows], out[:, :, rows], _backward_lse(lse[:, :, rows])
    if kernel == "cudnn":
        grads = _cudnn_backward(ds, qs, ks, vs, os_, ls, call.causal, scale)
    else:
        grads = _flash_backward(_bshd(ds), _bshd(qs), _bshd(ks), _bshd(vs), _bshd(os_), ls, None, None,
                                qs.shape[2], ks.shape[2], call.causal, scale, call.window_left, call.window_right)
        grads = tuple(g.transpose(1, 2) for g in grads)
    dq_s, dk_s, dv_s = (g.float() for g in grads)
    if call.covers(M, N):
        return dq_s, dk_s, dv_s
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    dq[:, :, rows], dk[:, :, keys], dv[:, :, keys] = dq_s, dk_s, dv_s
    return dq, dk, dv
