"""Float64 single-process references the tests compare against."""
from __future__ import annotations

import torch

__all__ = ["reference_attention", "rel_err", "visibility"]


def visibility(q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool = False, window: int | None = None,
               q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None,
               k_valid: torch.Tensor | None = None, behind: int | None = None,
               ahead: int | None = None) -> torch.Tensor:
    """[B or 1, M, N] boolean: is key j visible to query i — causal / window W, or a band
    ``-behind <= k - q <= ahead``; same document; a valid key (``k_valid`` [B, N] bool)."""
    diff = q_pos[:, None] - k_pos[None, :]
    vis = torch.ones(diff.shape, dtype=torch.bool)
    if causal or window is not None:
        vis &= diff >= 0
    if window is not None:
        vis &= diff < window
    if ahead is not None:
        vis &= -diff <= ahead
    if behind is not None:
        vis &= diff <= behind
    vis = vis[None]
    if q_doc is not None:
        vis = vis & (q_doc[:, :, None] == k_doc[:, None, :])
    if k_valid is not None:
        vis = vis & k_valid[:, None, :]
    return vis


def reference_attention(q, k, v, *, scale=None, causal=False, window=None, doc_ids=None,
                        q_pos=None, k_pos=None, k_doc=None, alibi_slopes=None, softcap=None, k_valid=None,
                        behind=None, ahead=None, rel_bias=None):
    """Plain softmax attention in float64 over full tensors q/k [B,H,S,D], v [B,H,S,Dv] (GQA by
    repeat_interleave), written from the definitions: ``s = scale · q kᵀ``, ``cap · tanh(s / cap)``
    with a softcap, ``+ slopes[h] · (k_pos − q_pos)`` with ALiBi slopes [Hq], ``+ rel_bias[h,
    k_pos − q_pos + L − 1]`` with a relative-position table [Hq, 2L − 1], then the mask.

    Returns (out, lse); rows that see no key give out = 0, lse = -inf.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, M, D = q.shape
    N = k.shape[-2]
    G = Hq // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    scale = D ** -0.5 if scale is None else scale
    q_pos = torch.arange(M) if q_pos is None else q_pos
    k_pos = torch.arange(N) if k_pos is None else k_pos
    k_doc = doc_ids if k_doc is None else k_doc
    vis = visibility(q_pos, k_pos, causal=causal, window=window, q_doc=doc_ids, k_doc=k_doc, k_valid=k_valid,
                     behind=behind, ahead=ahead)[:, None]
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        rel = (k_pos[None, :] - q_pos[:, None]).double()
        s = s + alibi_slopes.double()[:, None, None] * rel
    if rel_bias is not None:                 # [Hq, 2L - 1] over offsets -(L - 1) .. L - 1
        offset = k_pos[None, :] - q_pos[:, None] + (rel_bias.shape[-1] - 1) // 2
        s = s + rel_bias.double()[:, offset]
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    return p @ v, lse


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (0 when both are 0)."""
    x, ref = x.double(), ref.double()
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else num
