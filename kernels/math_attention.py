"""Block attention in plain tensor math: the fallback for any device and dtype, the only kernel
that takes a gradient of the log-sum-exp (``dlse``), and the CPU kernel for soft-capped scores
(ATen's kernels have no cap).

Scores are formed one query tile at a time (never the whole S×S, never more than a tile × N
bias), in fp32 (fp64 for fp64). Score semantics (``BlockMask``): ``s = scale · q kᵀ``, then
``s ← cap · tanh(s / cap)`` with a softcap, then ``+ slopes[h] · (k_pos − q_pos)`` with ALiBi and
``+ table[h, k_pos − q_pos + S − 1]`` with a relative-position table, then invisible pairs ``-inf``.

Shape legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, M query rows,
N key rows, D query/key head dim, Dv value head dim (may differ from D, as in MLA), T rows of
one tile, K keys of one tile.
"""
from __future__ import annotations

import torch

from .block_mask import (BlockMask, TilePlan, add_position_bias_grad, dense_visibility, plan_tiles, position_bias,
                         split_tiles)

__all__ = ["math_block_forward", "math_block_backward"]

TILE_ROWS = 512


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tiles(mask: BlockMask, M: int, N: int) -> list[TilePlan]:
    return split_tiles(plan_tiles(mask, M, N, TILE_ROWS), TILE_ROWS)


def _tile_scores(q: torch.Tensor, k: torch.Tensor, mask: BlockMask, tile: TilePlan,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores of one tile as [B, Hkv, G, T, K] in the accumulation dtype, and, with a softcap,
    ``tanh(raw / cap)`` (the backward's factor ``1 - tanh²``), else None."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    acc = _acc_dtype(q.dtype)
    qt = q[:, :, tile.q0:tile.q1].to(acc).reshape(B, Hkv, G, -1, D)
    kt = k[:, :, tile.k0:tile.k1].to(acc)[:, :, None]
    scores = (qt @ kt.transpose(-1, -2)) * scale
    capped = None
    if mask.softcap is not None:
        capped = torch.tanh(scores / mask.softcap)
        scores = capped * mask.softcap
    bias = position_bias(mask, tile, q.device, acc)                   # [Hq, T, K] or None
    if bias is not None:
        scores = scores + bias.reshape(Hkv, G, *bias.shape[1:])
    if tile.mode != "full":
        visible = dense_visibility(mask, tile, q.device)      # [T, K] or [B, T, K]
        if visible.dim() == 3:
            visible = visible[:, None, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores, capped


def math_block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B,Hq,M,D], k [B,Hkv,N,D], v [B,Hkv,N,Dv] → out [B,Hq,M,Dv] (q's dtype), lse [B,Hq,M]
    (fp32/fp64)."""
    B, Hq, M, _ = q.shape
    N, Dv = k.shape[-2], v.shape[-1]
    acc = _acc_dtype(q.dtype)
    out = torch.zeros(B, Hq, M, Dv, dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, M), float("-inf"), dtype=acc, device=q.device)
    for tile in _tiles(mask, M, N):
        scores, _ = _tile_scores(q, k, mask, tile, scale)
        lse_t = torch.logsumexp(scores, dim=-1)                       # [B,Hkv,G,T]
        probs = torch.exp(scores - torch.where(torch.isneginf(lse_t), 0.0, lse_t)[..., None])
        vt = v[:, :, tile.k0:tile.k1].to(acc)[:, :, None]
        out[:, :, tile.q0:tile.q1] = (probs @ vt).reshape(B, Hq, -1, Dv).to(q.dtype)
        lse[:, :, tile.q0:tile.q1] = lse_t.reshape(B, Hq, -1)
    return out, lse


def math_block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, mask: BlockMask, scale: float,
                        dlse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the merged (out, lse) and optionally d(lse).

    ``d lse_i / d s_ij = p_ij``, so a gradient on the lse just shifts the softmax's row term:
    ``ds = p * (dp - (rowsum(dout * out) - dlse))``. The ALiBi bias has no input to flow into; a
    learned relative-position table (``mask.rel_bias_grad`` given) gets ``ds`` summed per offset;
    a softcap multiplies ``ds`` by ``d(cap · tanh(r / cap)) / dr = 1 - tanh²(r / cap)``.
    dout/out [B,Hq,M,Dv] → dq [B,Hq,M,D], dk [B,Hkv,N,D], dv [B,Hkv,N,Dv] (fp32/fp64).
    """
    B, Hq, M, D = q.shape
    N, Hkv, Dv = k.shape[-2], k.shape[1], v.shape[-1]
    G = Hq // Hkv
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    lse = torch.where(torch.isneginf(lse), 0.0, lse.to(acc))
    delta = (dout.to(acc) * out.to(acc)).sum(-1)                       # [B,Hq,M]
    if dlse is not None:
        delta = delta - dlse.to(acc)
    for tile in _tiles(mask, M, N):
        rows, keys = slice(tile.q0, tile.q1), slice(tile.k0, tile.k1)
        scores, capped = _tile_scores(q, k, mask, tile, scale)        # [B,Hkv,G,T,K]
        probs = torch.exp(scores - lse[:, :, rows].reshape(B, Hkv, G, -1)[..., None])
        do_t = dout[:, :, rows].to(acc).reshape(B, Hkv, G, -1, Dv)
        vt = v[:, :, keys].to(acc)[:, :, None]
        kt = k[:, :, keys].to(acc)[:, :, None]
        qt = q[:, :, rows].to(acc).reshape(B, Hkv, G, -1, D)
        dv[:, :, keys] += (probs.transpose(-1, -2) @ do_t).sum(2)
        dp = do_t @ vt.transpose(-1, -2)
        ds = probs * (dp - delta[:, :, rows].reshape(B, Hkv, G, -1)[..., None])
        if mask.rel_bias_grad is not None:                            # the bias is added after the cap
            add_position_bias_grad(mask, tile, ds.sum(0).reshape(Hq, tile.q1 - tile.q0, -1))
        if capped is not None:
            ds = ds * (1 - capped * capped)
        dq[:, :, rows] += (ds @ kt).reshape(B, Hq, -1, D) * scale
        dk[:, :, keys] += (ds.transpose(-1, -2) @ qt).sum(2) * scale
    return dq, dk, dv
