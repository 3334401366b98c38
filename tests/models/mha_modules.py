"""``nn.MultiheadAttention`` called with its defaults (issue 12).

``nn.MultiheadAttention(...)(x, x, x)`` has ``need_weights=True`` by default: it returns the
head-averaged weights [B, S, S] next to the output, and most users drop them (``y, _ = ...``).
Dynamo then keeps only output 0 of ``F.multi_head_attention_forward``, so the call shards.
Reading the weights, or passing a key padding mask, keeps the call whole: a warned, exact
fallback (the ring has no per-key padding kind and never materialises S×S weights).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["MHADefault"]


class MHADefault(nn.Module):
    """``y, w = mha(x, x, x, attn_mask=causal)`` with every other argument left at its default;
    ``batch_first`` either way. ``read_weights`` adds ``w`` to the output (so it is used);
    ``key_padding`` passes a (float) key padding mask hiding no key. x [B, S, C] → [B, S, C]."""

    def __init__(self, width=32, heads=4, batch_first=True, read_weights=False, key_padding=False):
        super().__init__()
        self.mha = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.batch_first, self.read_weights, self.key_padding = batch_first, read_weights, key_padding

    def forward(self, x):
        b, s = x.shape[:2]
        if not self.batch_first:
            x = x.transpose(0, 1)                                   # [S, B, C]
        mask = nn.Transformer.generate_square_subsequent_mask(s, device=x.device, dtype=x.dtype)
        # float like attn_mask (a bool one makes torch warn about mismatched masks: a graph break)
        pad = torch.zeros(b, s, dtype=x.dtype, device=x.device) if self.key_padding else None
        y, w = self.mha(x, x, x, attn_mask=mask, key_padding_mask=pad)
        y = y if self.batch_first else y.transpose(0, 1)
        if self.read_weights:                                       # w [B, S, S], read: mixes it into y
            y = y + (w * w).sum(-1, keepdim=True)
        return y
