"""Attention that runs replicated, one cause per case, on spawned ranks (issue 16).

Each case compiles a tiny causal language model (embedding → q/k/v → attention → head → loss)
whose attention the compiler cannot make a ring for one reason, and returns the seqpar warnings
this rank saw, the error under ``fallback="error"``, and the error of the loss against eager.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

import seqpar_compiler as sp

V, C, H = 64, 32, 4


class _TinyLM(torch.nn.Module):
    """``mix`` runs between the embedding and attention; ``attend`` is the attention call."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.emb = torch.nn.Embedding(V, C)
        self.qkv = torch.nn.Linear(C, 3 * C)
        self.head = torch.nn.Linear(C, V)

    def forward(self, idx, targets, mask=None):
        x = self.emb(idx)                                          # [B, S, C]
        if self.how == "no-rule":
            x = torch.fft.fft(x, dim=1).real / 4                   # no sharding rule: gathered
        B, S, _ = x.shape
        q, k, v = (t.view(B, S, H, C // H).transpose(1, 2) for t in self.qkv(x).split(C, -1))
        if self.how == "checkpoint":
            y = torch.utils.checkpoint.checkpoint(_causal_attention, q, k, v, use_reentrant=False)
        elif self.how == "disabled":
            y = _disabled_attention(q, k, v)
        elif self.how == "mask-input":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = _causal_attention(q, k, v)
        logits = self.head(y.transpose(1, 2).reshape(B, S, C))
        return F.cross_entropy(logits.view(-1, V), targets.view(-1))


def _causal_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@torch.compiler.disable
def _disabled_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def replicated_case(rank, P, *, how, fallback="gather", dump=None, S=32):
    torch.manual_seed(0)
    model = _TinyLM(how)
    g = torch.Generator().manual_seed(1)
    idx, tgt = torch.randint(0, V, (2, S), generator=g), torch.randint(0, V, (2, S), generator=g)
    mask = torch.ones(S, S, dtype=torch.bool).tril() if how == "mask-input" else None
    torch._dynamo.reset()
    opts = dict(inner="aot_eager", schedule="zigzag", fallback=fallback)
    if dump:
        opts["dump"] = dump
    with warnings.catch_warnings(record=True) as caught, sp.stats() as st:
        warnings.simplefilter("always")
        try:
            loss = torch.compile(model, backend=sp.backend(**opts))(idx, tgt, mask)
        except Exception as err:  # noqa: BLE001 - the error is the result of the strict cases
            return {"error": str(err), "warnings": []}
    ref = model(idx, tgt, mask)
    return {"error": None, "loss_err": float((loss - ref).abs() / ref.abs()), "ring_calls": st.attention_forward_calls,
            "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)]}


def run_cases(rank, P, cases):
    return {name: replicated_case(rank, P, **kw) for name, kw in cases}
