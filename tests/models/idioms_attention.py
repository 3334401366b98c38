"""Attention-form idioms of the corpus (issue 12): attention written the ways real codebases
write it (``attention_modules.py``), each in a tiny LM that must run it as the ring, exact.

Each idiom: embedding → x + attention(x) → head → cross-entropy over the batch. The attention
is the idiom; ``ring_calls=1`` says it ran as ring attention on every rank.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

import attention_modules as M
from idiom_corpus import C, S, V, CausalSelfAttention, idiom, labels, token_ids


class _AttnLM(nn.Module):
    """ids [B, S] → logits [B, S, V] → mean cross-entropy; ``attn`` maps [B, S, C] → [B, S, C]."""

    def __init__(self, *attn: nn.Module):
        super().__init__()
        self.emb = nn.Embedding(V, C)
        self.attn = nn.ModuleList(attn)
        self.head = nn.Linear(C, V, bias=False)

    def forward(self, ids, y):
        x = self.emb(ids)
        for a in self.attn:
            x = x + a(x)
        return F.cross_entropy(self.head(x).reshape(-1, V), y.reshape(-1))


def _register(name, make, **kw):
    idiom(name, **kw)(lambda: (_AttnLM(*make()), (token_ids(), labels())))


_register("einsum-einops-causal", lambda: [M.EinsumAttention()])
_register("einsum-bshd-layout", lambda: [M.EinsumAttention(layout="bshd")])
_register("einsum-einops-window", lambda: [M.EinsumAttention(window=6)])
_register("baddbmm-where-tril-buffer", lambda: [M.BaddbmmAttention()])
_register("alibi-signed-causal", lambda: [M.AlibiAttention(form="signed")])
_register("alibi-mpt-key-only-sdpa", lambda: [M.AlibiAttention(form="mpt")])
_register("alibi-bidirectional", lambda: [M.AlibiAttention(form="bidirectional")])
_register("softcap-gemma2", lambda: [M.SoftcapAttention(cap=5.0)])
_register("multihead-attention-batch-first", lambda: [M.MHAAttention(batch_first=True)])
_register("multihead-attention-sequence-first", lambda: [M.MHAAttention(batch_first=False)])
_register("multihead-attention-is-causal-hint", lambda: [M.MHAAttention(is_causal=True)])
_register("transformer-encoder-layer-causal", lambda: [M.EncoderLayerAttention()])
_register("sdpa-window-repeat-interleave-kv", lambda: [M.SDPAWindowGQA(window=6)])
_register("sdpa-causal-lower-right", lambda: [M.SDPALowerRight(C, 4, seq=S)])
_register("value-head-dim-mla", lambda: [M.ValueDimAttention(v_dim=12)])
# a fixed relative bias that is not ALiBi (T5-like table[h, |i − j|]) is a per-head table of the
# offset, carried to the ring; a learned bias per (query, key) pair is no such table: the plain
# attention next to it runs as the ring, it gathers its q/k (warned at the scores' matmul), exact
_register("relative-bias-table-of-the-offset", lambda: [CausalSelfAttention(), M.AdditiveBiasAttention()],
          ring_calls=2)
_register("learned-pair-bias-falls-back", lambda: [CausalSelfAttention(), M.PairBiasAttention()], fallback="matmul")

