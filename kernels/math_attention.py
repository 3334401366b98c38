"""Block attention in plain tensor math: the fallback for any device and dtype, and the only
kernel that takes a gradient of the log-sum-exp (``dlse``).

Scores are formed one query tile at a time (never the whole S×S), in fp32 (fp64 for fp64).

Shape legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, M query rows,
N key rows, D head dim, T rows of one tile, K keys of one tile.
"""
from __future__ import annotations

import torch

from .block_mask import BlockMask, TilePlan, dense_visibility, plan_tiles

__all__ = ["math_block_forward", "math_block_backward"]

TILE_ROWS = 512


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile_scores(q: torch.Tensor, k: torch.Tensor, mask: BlockMask, tile: TilePlan,
                 scale: float) -> torch.Tensor:
    """Masked scores of one tile as [B, Hkv, G, T, K] in the accumulation dtype."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    acc = _acc_dtype(q.dtype)
    qt = q[:, :, tile.q0:tile.q1].to(acc).reshape(B, Hkv, Hq // Hkv, -1, D)
    kt = k[:, :, tile.k0:tile.k1].to(acc)[:, :, None]
    scores = (qt @ kt.transpose(-1, -2)) * scale
    if tile.mode != "full":
        visible = dense_visibility(mask, tile, q.device)      # [T, K] or [B, T, K]
        if visible.dim() == 3:
            visible = visible[:, None, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def math_block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B,Hq,M,D], k/v [B,Hkv,N,D] → out [B,Hq,M,D] (q's dtype), lse [B,Hq,M] (fp32/fp64)."""
    B, Hq, M, D = q.shape
    N = k.shape[-2]
    acc = _acc_dtype(q.dtype)
    out = torch.zeros(B, Hq, M, D, dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, M), float("-inf"), dtype=acc, device=q.device)
    for tile in plan_tiles(mask, M, N, TILE_ROWS):
        scores = _tile_scores(q, k, mask, tile, scale)
        lse_t = torch.logsumexp(scores, dim=-1)                       # [B,Hkv,G,T]
        probs = torch.exp(scores - torch.where(torch.isneginf(lse_t), 0.0, lse_t)[..., None])
        vt = v[:, :, tile.k0:tile.k1].to(acc)[:, :, None]
        out[:, :, tile.q0:tile.q1] = (probs @ vt).reshape(B, Hq, -1, D).to(q.dtype)
        lse[:, :, tile.q0:tile.q1] = lse_t.reshape(B, Hq, -1)
    return out, lse


def math_block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, mask: BlockMask, scale: float,
                        dlse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the merged (out, lse) and optionally d(lse).

    ``d lse_i / d s_ij = p_ij``, so a gradient on the lse just shifts the softmax's row term:
    ``ds = p * (dp - (rowsum(dout * out) - dlse))``.
    """
    B, Hq, M, D = q.shape
    N, Hkv = k.shape[-2], k.shape[1]
    G = Hq // Hkv
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    lse = torch.where(torch.isneginf(lse), 0.0, lse.to(acc))
    delta = (dout.to(acc) * out.to(acc)).sum(-1)                       # [B,Hq,M]
    if dlse is not None:
        delta = delta - dlse.to(acc)
    for tile in plan_tiles(mask, M, N, TILE_ROWS):
        rows, keys = slice(tile.q0, tile.q1), slice(tile.k0, tile.k1)
        scores = _tile_scores(q, k, mask, tile, scale)                # [B,Hkv,G,T,K]
        probs = torch.exp(scores - lse[:, :, rows].reshape(B, Hkv, G, -1)[..., None])
        do_t = dout[:, :, rows].to(acc).reshape(B, Hkv, G, -1, D)
        vt = v[:, :, keys].to(acc)[:, :, None]
        kt = k[:, :, keys].to(acc)[:, :, None]
        qt = q[:, :, rows].to(acc).reshape(B, Hkv, G, -1, D)
        dv[:, :, keys] += (probs.transpose(-1, -2) @ do_t).sum(2)
        dp = do_t @ vt.transpose(-1, -2)
        ds = probs * (dp - delta[:, :, rows].reshape(B, Hkv, G, -1)[..., None])
        dq[:, :, rows] += (ds @ kt).reshape(B, Hq, -1, D) * scale
        dk[:, :, keys] += (ds.transpose(-1, -2) @ qt).sum(2) * scale
    return dq, dk, dv
