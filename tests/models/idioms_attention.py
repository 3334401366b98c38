"""Attention-form idioms of the corpus (issue 12): attention written the ways real codebases
write it (``attention_modules.py``), each in a tiny LM that must run it as the ring, exact.

Each idiom: embedding → x + attention(x) → head → cross-entropy over the batch. The attention
is the idiom; ``ring_calls=1`` says it ran as ring attention on every rank.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import alibi_modules as AL
import attention_modules as M
import flex_modules as FX
import mha_modules as MH
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
# a relative bias that is not ALiBi cannot be carried by the ring: the plain attention next to it
# runs as the ring, the T5-like one gathers its q/k (warned at the scores' matmul) and stays exact
_register("relative-bias-not-alibi-falls-back", lambda: [CausalSelfAttention(), M.AdditiveBiasAttention()],
          fallback="matmul")


# -- flex_attention (the compiled run traces flex_attention; the eager reference is the same
# attention through SDPA with an explicit mask on the same weights: see flex_modules.py) --------
def _doc_ids(batch: int = 2, seq: int = S):
    """Packed documents [B, S]: uneven lengths, different per row (3 and 2 documents)."""
    cuts = [[0] * 7 + [1] * 16 + [2] * (seq - 23), [0] * 19 + [1] * (seq - 19)]
    return torch.tensor(cuts[:batch])


def _restarting_positions(batch: int = 2, seq: int = S):
    """Position ids that restart at every document of ``_doc_ids`` (how packed batches come)."""
    doc = _doc_ids(batch, seq)
    pos = torch.zeros_like(doc)
    for b in range(batch):
        start = 0
        for t in range(1, seq):
            start = t if doc[b, t] != doc[b, t - 1] else start
            pos[b, t] = t - start
    return pos


class _DocLM(_AttnLM):
    """``_AttnLM`` whose attention also reads per-token document data doc [B, S]."""

    def forward(self, ids, y, doc):
        x = self.emb(ids)
        for a in self.attn:
            x = x + a(x, doc)
        return F.cross_entropy(self.head(x).reshape(-1, V), y.reshape(-1))


def _register_flex(name, docs="input", **kw):
    def build():
        FX.allow_cpu_flex_capture()
        data = _restarting_positions() if docs == "computed" else _doc_ids()
        return _DocLM(FX.FlexDocAttention(docs=docs, **kw)), (token_ids(), labels(), data)
    idiom(name)(build)


_register_flex("flex-attention-causal", docs=None)
_register_flex("flex-attention-window", docs=None, window=6)
_register_flex("flex-attention-documents", causal=False)
_register_flex("flex-attention-documents-causal")
_register_flex("flex-attention-documents-window", window=6)
_register_flex("flex-attention-documents-from-position-ids", docs="computed")
_register_flex("flex-attention-softcap-score-mod", score="softcap")
_register_flex("flex-attention-alibi-score-mod", docs=None, score="alibi")


# -- ALiBi before the scale and through baddbmm's beta/alpha (the ring's slopes: slope · scale) --
_register("alibi-added-before-the-scale", lambda: [AL.AlibiBeforeScale()])
_register("alibi-baddbmm-beta-alpha-keywords", lambda: [AL.BaddbmmAlibi(beta=0.5, keywords=True)])
_register("alibi-baddbmm-beta-alpha-positional", lambda: [AL.BaddbmmAlibi(beta=2.0, keywords=False)])

# -- nn.MultiheadAttention with its defaults: need_weights=True, the weights dropped ----------------
_register("multihead-attention-default-need-weights", lambda: [MH.MHADefault()])
_register("multihead-attention-default-need-weights-sequence-first", lambda: [MH.MHADefault(batch_first=False)])
# a key padding mask is no mask kind the ring carries (per key, from user data): the call stays
# whole, a warned exact fallback; the plain attention next to it still runs as the ring
_register("multihead-attention-key-padding-falls-back",
          lambda: [CausalSelfAttention(), MH.MHADefault(key_padding=True)], fallback="multi_head_attention_forward")
# attention weights that are read are an S×S tensor the ring never builds: the same warned fallback
_register("multihead-attention-weights-read-falls-back",
          lambda: [CausalSelfAttention(), MH.MHADefault(read_weights=True)], fallback="multi_head_attention_forward")
