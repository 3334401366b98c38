"""Hand-written models whose mask is built once and used across graph breaks (issue 13): the
mask leaves the frame that builds it as proved facts (``ProvedMask``) and every later frame's
attention is proved from them. Three styles, each with a break after every block:

  * ``sdpa-bool``: ``F.scaled_dot_product_attention(q, k, v, attn_mask=visible)`` (bool, True = visible);
  * ``additive-window``: ``softmax(q kᵀ · s + mask)`` with a float sliding-window mask (0 / -inf);
  * ``fill-hidden``: ``scores.masked_fill(hidden, -inf)`` with a bool mask, True = hidden;
  * ``padding-bool``: ``sdpa-bool`` with a key-padding factor from the ids (``idx >= 32`` marks the
    valid keys): the mask crosses the breaks as facts plus the per-token validity.

Each case returns the relative errors of the loss and every parameter gradient against
single-process eager, the ring-forward count, the step's sequence all-gathers, the full-length
saves and the seqpar warnings.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import frames_workers as FW
import seqpar_compiler as sp

__all__ = ["MaskedLM", "mask_break_case", "run_cases"]

WINDOW = 7


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, style: str):
        super().__init__()
        self.heads, self.style = heads, style
        self.norm, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, mask):
        B, S, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, S, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.style in ("sdpa-bool", "padding-bool"):
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            scores = q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5
            scores = scores + mask if self.style == "additive-window" else scores.masked_fill(mask, float("-inf"))
            a = scores.softmax(-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, d))
        return x + self.ffn(x)


class MaskedLM(nn.Module):
    """Builds its mask from ``arange`` once, then breaks the graph after every block."""

    def __init__(self, style: str, vocab: int = 256, d: int = 32, heads: int = 2, layers: int = 2):
        super().__init__()
        self.style = style
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d, heads, style) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def _mask(self, S: int, device, idx):
        i = torch.arange(S, device=device)
        visible = i[None, :] <= i[:, None]
        if self.style == "sdpa-bool":
            return visible
        if self.style == "padding-bool":
            return visible & (idx >= 32)[:, None, None, :]
        if self.style == "fill-hidden":
            return ~visible
        visible = visible & (i[None, :] > i[:, None] - WINDOW)
        return torch.zeros(S, S, device=device).masked_fill(~visible, float("-inf"))

    def forward(self, idx, targets):
        h = self.emb(idx)
        mask = self._mask(idx.shape[1], idx.device, idx)
        for block in self.blocks:
            h = block(h, mask)
            torch._dynamo.graph_break()
        logits = self.head(h)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def mask_break_case(rank, P, *, style, inner="aot_eager", **options):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m, ref = MaskedLM(style), MaskedLM(style)
    ref.load_state_dict(m.state_dict())
    compiled = torch.compile(m, backend=sp.backend(inner=inner, schedule="zigzag", **options))
    idx, tgt = FW._batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(idx, tgt).backward()
        m.zero_grad()
        with sp.stats() as st, FW.GatherCounter() as gathers:
            saves, loss = FW.full_length_saves(lambda: compiled(idx, tgt), [idx, tgt])
            loss.backward()
            n_gathers = gathers.calls
    r = ref(idx, tgt)
    r.backward()
    grads = {n: FW._rel(p.grad, q.grad) for (n, p), q in zip(m.named_parameters(), ref.parameters())}
    return {"loss": FW._rel(loss, r), "grads": grads, "ring_calls": st.attention_forward_calls,
            "layers": len(m.blocks), "gathers": n_gathers, "full_saves": saves,
            "warnings": [str(w.message)[:300] for w in caught if "seqpar" in str(w.message)]}


def run_cases(rank, P, cases):
    return {name: mask_break_case(rank, P, **kw) for name, kw in cases}
