"""Masks and position biases added to attention scores, proved from their evaluated values.

Reads nothing from the graph: works on the values ``mask_proof.evaluate_mask_term`` computed
for every mask or additive term peeled off the scores. Writes nothing.

Why by value: the ring cannot take an S×S tensor, only data it evaluates per block from global
positions (a band of visible positions, ALiBi slopes). So a term is accepted only if, at the
global sequence length, it *equals* such data:
  * visibility (bool masks, and the -inf / ``finfo.min`` entries of float terms) must be
    exactly a band: no mask, causal, a sliding window, a local window (``mask_proof.band_of``);
  * the finite part of the float terms, on the visible pairs, must be ``slope_h · (j − i) +
    c(b, h, i)`` for one slope per head, the same for every batch row (``fit_alibi``). The
    per-row constant ``c`` is free because softmax over keys is invariant to it: that is what
    makes MPT's key-only ``slope_h · j`` (and ``slope_h · (j − S + 1)``) the same attention as
    the signed ``slope_h · (j − i)`` form of the ALiBi paper;
  * else any per-head function of the offset, ``table[h, j − i]`` the same for every batch row
    (``fit_table``: a symmetric ALiBi ``−slope_h · |j − i|`` in an encoder, a static T5-style
    bucketed bias), carried as a [H, 2S − 1] table.
A fit that leaves a residual beyond float rounding is refused (the attention then falls back),
never approximated.
"""
from __future__ import annotations

import torch

from seqpar_compiler.kernels import AttentionSpec

from .mask_proof import band_of, is_hidden_value

__all__ = ["fit_alibi", "fit_table", "prove_score_terms"]


def fit_alibi(bias: torch.Tensor, visible: torch.Tensor) -> torch.Tensor | None:
    """Per-head slopes [H] (fp32) with ``bias[b, h, i, j] = slopes[h]·(j − i) + c[b, h, i]`` on
    every visible pair, or None when no such slopes exist.

    Shapes: bias [B, H, S, S] (float, finite where visible), visible [B, H, S, S] bool.
    """
    t = bias.double().masked_fill(~visible, 0.0)
    B, H, S, _ = t.shape
    j = torch.arange(S, dtype=torch.float64).expand(B, H, S, S)
    w = visible.double()
    count = w.sum(-1, keepdim=True).clamp_min(1)
    jc = (j - (j * w).sum(-1, keepdim=True) / count) * w          # key index, centred per row
    tc = (t - (t * w).sum(-1, keepdim=True) / count) * w          # the term, centred per row
    den = (jc * jc).sum((-2, -1))                                  # [B, H]
    slopes = torch.where(den > 0, (tc * jc).sum((-2, -1)) / den.clamp_min(1e-300), torch.zeros_like(den))
    tol = 16 * torch.finfo(bias.dtype).eps * max(1.0, float(t.abs().max()))
    if not torch.allclose(slopes, slopes[:1].expand_as(slopes), rtol=0, atol=tol / max(S, 1)):
        return None                                                # slopes differ across the batch
    if float((tc - slopes[..., None, None] * jc).abs().max()) > tol:
        return None
    return slopes[0].float()


def fit_table(bias: torch.Tensor, visible: torch.Tensor) -> torch.Tensor | None:
    """A table [H, 2S − 1] (fp32) with ``bias[b, h, i, j] = table[h, j − i + S − 1]`` on every
    visible pair (entries of offsets no visible pair has are 0), or None when no such table
    exists. Shapes: bias [B, H, S, S] (float, finite where visible), visible [B, H, S, S] bool."""
    t = bias.double().masked_fill(~visible, 0.0)
    B, H, S, _ = t.shape
    offset = (torch.arange(S)[None, :] - torch.arange(S)[:, None] + S - 1).expand(B, H, S, S)   # j − i + S − 1
    w = visible.double()
    index = offset.transpose(0, 1).reshape(H, -1)
    sums = torch.zeros(H, 2 * S - 1, dtype=torch.float64).scatter_add_(1, index, t.transpose(0, 1).reshape(H, -1))
    counts = torch.zeros(H, 2 * S - 1, dtype=torch.float64).scatter_add_(1, index, w.transpose(0, 1).reshape(H, -1))
    table = sums / counts.clamp_min(1)
    rebuilt = table[torch.arange(H)[:, None, None], offset[0]]                       # [H, S, S]
    tol = 16 * torch.finfo(bias.dtype).eps * max(1.0, float(t.abs().max()))
    if float(((t - rebuilt[None]) * w).abs().max()) > tol:
        return None
    return table.float()


def prove_score_terms(terms: list[tuple[str, torch.Tensor]], shape: tuple, S: int
                      ) -> tuple[AttentionSpec, torch.Tensor | None, torch.Tensor | None] | None:
    """(band, slopes [H] or None, table [H, 2S − 1] or None) of the masks and additive terms of
    one attention.

    Args:
        terms: ``("visible", bool)`` for masks (True = the key is visible) and
            ``("additive", float)`` for terms added to the scores (hidden where -inf or at most
            half the dtype's lowest value); each broadcastable to ``shape``.
        shape: the scores' shape [B, H, S, S].
    Returns None if the visibility is no band or the finite part is neither an ALiBi nor a
    function of the offset.
    """
    visible = torch.ones(shape, dtype=torch.bool)
    bias = None
    for kind, value in terms:
        value = torch.broadcast_to(value.cpu(), shape)
        if kind == "visible":
            if value.dtype != torch.bool:
                return None
            visible = visible & value
            continue
        if not value.is_floating_point():
            return None
        hidden = is_hidden_value(value)
        visible = visible & ~hidden
        finite = value.masked_fill(hidden, 0.0)
        bias = finite if bias is None else bias + finite
    band = band_of(visible, S)
    if band is None:
        return None
    slopes = table = None
    if bias is not None and bool((bias.masked_fill(~visible, 0.0) != 0).any()):
        slopes = fit_alibi(bias, visible)
        if slopes is None:
            table = fit_table(bias, visible)
            if table is None:
                return None
        elif not bool(slopes.ne(0).any()):
            slopes = None                  # a per-row constant: softmax does not see it
    return band, slopes, table
