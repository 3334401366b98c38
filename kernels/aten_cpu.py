"""Block attention on CPU through ATen's flash kernel.

``aten._scaled_dot_product_flash_attention_for_cpu`` is a tiled flash kernel (no S×S score
matrix), returns the log-sum-exp, supports GQA natively (key head = query head // G) and has a
matching backward that takes a saved (out, lse): exactly the block interface the ring needs.
Two quirks are fixed here (docs/architecture.md):
  * it rejects boolean masks (the mask must have the query's dtype), so visibility becomes an
    additive 0 / -inf mask, built per tile, never for the whole block;
  * a row that sees no key comes back with lse = 0; the contract is out = 0, lse = -inf.

Score semantics beyond ``scale · q kᵀ``:
  * ALiBi: the kernel's only bias input is its additive mask, so the bias is materialised per
    query tile (``TILE_ROWS`` × N, never M × N) in fp32 (a bf16 mask would round a bias of a few
    hundred by whole units; the kernel takes an fp32 mask with bf16/fp16 inputs, checked), with
    -inf on invisible pairs;
  * soft-capping: no ATen kernel has a cap, so those blocks run the math kernel (tiled too);
  * Dv ≠ D: the kernel wants one head size, so the narrower side is zero-padded per block, which
    is exact (zero value columns give zero output columns; zero query/key columns add nothing to
    q·k) and sliced off the results.

Shape legend: B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0), M query rows,
N key rows, D query/key head dim, Dv value head dim, T rows of one tile, K keys of one tile.
LSE is fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .block_mask import BlockMask, TilePlan, dense_visibility, plan_tiles, position_bias, split_tiles
from .math_attention import math_block_backward, math_block_forward

__all__ = ["aten_block_forward", "aten_block_backward", "ATEN_DTYPES"]

ATEN_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Rows per tile when a block needs an explicit mask: a [TILE_ROWS, N] additive mask stays a
# few MB at the key lengths one rank holds.
TILE_ROWS = 256

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _additive_mask(mask: BlockMask, tile: TilePlan, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(additive mask broadcastable to [B, Hq, T, K], rows-alive [B or 1, T]).

    Without a bias from positions: 0 / -inf in the query's dtype. With one (ALiBi, a
    relative-position table): the bias [1 or B, Hq, T, K] in fp32 (fp64 for fp64) with -inf on
    invisible pairs (all pairs of a ``full`` tile are visible).
    """
    T, K = tile.q1 - tile.q0, tile.k1 - tile.k0
    if tile.mode == "full":
        visible = torch.ones(T, K, dtype=torch.bool)
    else:
        visible = dense_visibility(mask, tile, torch.device("cpu"))
    alive = visible.any(dim=-1)
    alive = alive[None] if visible.dim() == 2 else alive
    vis4 = visible[None, None] if visible.dim() == 2 else visible[:, None]     # [1 or B, 1, T, K]
    bias = position_bias(mask, tile, torch.device("cpu"), _lse_dtype(dtype))        # [Hq, T, K] or None
    if bias is None:
        return torch.zeros(vis4.shape, dtype=dtype).masked_fill_(~vis4, float("-inf")), alive
    return bias[None].masked_fill(~vis4, float("-inf")), alive


def _tiles(mask: BlockMask, M: int, N: int) -> list[TilePlan]:
    """Kernel calls of a block: with a bias from positions (ALiBi, a relative-position table),
    every call takes its bias as a mask, so calls are cut to ``TILE_ROWS`` query rows and all of
    them are ``dense``."""
    tiles = plan_tiles(mask, M, N, TILE_ROWS)
    if not mask.position_biased:
        return tiles
    return [TilePlan(t.q0, t.q1, t.k0, t.k1, "dense") for t in split_tiles(tiles, TILE_ROWS)]


def _pad_head_dims(*xs_and_widths) -> list[torch.Tensor]:
    """Each tensor zero-padded on its last dim to the given width (itself when already that wide)."""
    return [x if x.shape[-1] == w else F.pad(x, (0, w - x.shape[-1])) for x, w in xs_and_widths]


def _one_call(tiles: list[TilePlan], M: int, N: int) -> bool:
    """True if one unmasked or causal kernel call covers the whole [M, N] block."""
    return (len(tiles) == 1 and tiles[0].mode != "dense"
            and (tiles[0].q0, tiles[0].q1, tiles[0].k0, tiles[0].k1) == (0, M, 0, N))


def aten_block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one block. q [B,Hq,M,D], k/v [B,Hkv,N,D] → out [B,Hq,M,D], lse [B,Hq,M].

    Inputs may have any strides (the kernel reads them strided). A block that is one unmasked
    or causal call returns the kernel's own results (out laid out as [B, M, Hq, D] in memory):
    no zero-filled copy of an activation-sized tensor. v may be [B,Hkv,N,Dv]: out is then
    [B,Hq,M,Dv].
    """
    if mask.softcap is not None:
        return math_block_forward(q, k, v, mask, scale)
    D, Dv = q.shape[-1], v.shape[-1]
    if D != Dv:
        W = max(D, Dv)
        qp, kp, vp = _pad_head_dims((q, W), (k, W), (v, W))
        out, lse = aten_block_forward(qp, kp, vp, mask, scale)
        return out[..., :Dv], lse
    B, Hq, M, D = q.shape
    N = k.shape[-2]
    tiles = _tiles(mask, M, N)
    if _one_call(tiles, M, N):
        return _flash(q, k, v, 0.0, tiles[0].mode == "causal", scale=scale)
    out = q.new_zeros(B, M, Hq, D).transpose(1, 2)
    lse = torch.full((B, Hq, M), float("-inf"), dtype=_lse_dtype(q.dtype))
    for tile in tiles:
        qt = q[:, :, tile.q0:tile.q1]
        kt, vt = k[:, :, tile.k0:tile.k1], v[:, :, tile.k0:tile.k1]
        if tile.mode == "dense":
            additive, alive = _additive_mask(mask, tile, q.dtype)
            o_t, lse_t = _flash(qt, kt, vt, 0.0, False, attn_mask=additive, scale=scale)
            lse_t = lse_t.masked_fill(~alive[:, None, :], float("-inf"))
        else:
            o_t, lse_t = _flash(qt, kt, vt, 0.0, tile.mode == "causal", scale=scale)
        out[:, :, tile.q0:tile.q1] = o_t
        lse[:, :, tile.q0:tile.q1] = lse_t
    return out, lse


def aten_block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, mask: BlockMask,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *merged* (out, lse) of the whole attention.

    With the global out and lse, ``exp(s - lse)`` is this block's share of the global softmax,
    so the per-block gradients sum to the gradient of the whole attention.
    Returns fp32 (fp64 for fp64 inputs) dq [B,Hq,M,D], dk [B,Hkv,N,D], dv [B,Hkv,N,Dv]
    (dout/out [B,Hq,M,Dv]).
    """
    if mask.softcap is not None:
        return math_block_backward(dout, q, k, v, out, lse, mask, scale)
    D, Dv = q.shape[-1], v.shape[-1]
    if D != Dv:
        W = max(D, Dv)
        padded = _pad_head_dims((dout, W), (q, W), (k, W), (v, W), (out, W))
        dq, dk, dv = aten_block_backward(*padded[:4], padded[4], lse, mask, scale)
        return dq[..., :D], dk[..., :D], dv[..., :Dv]
    acc = _lse_dtype(q.dtype)
    B, Hq, M, D = q.shape
    N = k.shape[-2]
    # Rows dead everywhere have lse = -inf; exp(-inf - (-inf)) would be NaN. Their scores are
    # -inf (or they are in no tile), so any finite lse gives them zero probability.
    lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).to(acc)
    out = out.to(q.dtype)
    dout = dout.to(q.dtype)
    tiles = _tiles(mask, M, N)
    if _one_call(tiles, M, N):
        # one call covers the block: its results are the block's gradients (no zero-filled
        # accumulators; a no-op cast for fp32/fp64)
        grads = _flash_backward(dout, q, k, v, out, lse, 0.0, tiles[0].mode == "causal", scale=scale)
        return tuple(g.to(acc) for g in grads)
    dq = torch.zeros(q.shape, dtype=acc)
    dk = torch.zeros(k.shape, dtype=acc)
    dv = torch.zeros(v.shape, dtype=acc)
    for tile in tiles:
        rows = slice(tile.q0, tile.q1)
        keys = slice(tile.k0, tile.k1)
        attn_mask = None
        if tile.mode == "dense":
            attn_mask, _ = _additive_mask(mask, tile, q.dtype)
        # the kernel reads strided inputs: no contiguous copies of the row slices
        dq_t, dk_t, dv_t = _flash_backward(
            dout[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows], lse[:, :, rows],
            0.0, tile.mode == "causal", attn_mask=attn_mask, scale=scale)
        dq[:, :, rows] += dq_t
        dk[:, :, keys] += dk_t
        dv[:, :, keys] += dv_t
    return dq, dk, dv
