"""More attention-form idioms (issue 12 follow-up): flex_attention with document / soft-cap /
ALiBi mods, ALiBi before the scale and through baddbmm's beta/alpha, nn.MultiheadAttention with
its defaults. Not loaded by ``idiom_corpus.load_idioms()``: ``test_idiom_corpus_attention_more.py``
runs them in spawns of their own (one spawn of the whole corpus outgrew the 300 s test timeout
on 2 loaded cores). ``GROUPS`` names the spawns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import alibi_modules as AL
import flex_modules as FX
import mha_modules as MH
from idiom_corpus import IDIOMS, S, V, CausalSelfAttention, labels, token_ids
from idioms_attention import _AttnLM, _register

__all__ = ["GROUPS", "run_more_idioms"]
_BEFORE = set(IDIOMS)


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
    from idiom_corpus import idiom
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


GROUPS = {"flex": sorted(n for n in set(IDIOMS) - _BEFORE if n.startswith("flex-")),
          "alibi-mha": sorted(n for n in set(IDIOMS) - _BEFORE if not n.startswith("flex-"))}


def run_more_idioms(rank: int, P: int, names: list[str]) -> dict:
    """``idiom_corpus.run_idioms`` on a rank that has imported this module (so these are registered)."""
    from idiom_corpus import run_idioms
    return run_idioms(rank, P, names)
