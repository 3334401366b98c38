"""Ranks' side of tests/dist/test_attention_rules.py: tiny attention modules compiled with the
seqpar backend, forward and backward compared with single-process eager.

``canonical_attention`` is kept as one graph call (``torch._dynamo.allow_in_graph``, in these
spawned processes only), so the rule that turns the canonical node with ALiBi slopes, a softcap
and Dv ≠ D into the ring op is tested on its own, whatever the attention patterns recognise.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import seqpar_compiler as sp
from seqpar_compiler.kernels import AttentionSpec
from seqpar_compiler.passes.attention_patterns import canonical_attention

torch._dynamo.allow_in_graph(canonical_attention)

B, S, C, H, D = 2, 32, 32, 4, 8


class CanonicalAttention(nn.Module):
    """q/k of head dim D, v of head dim Dv, the canonical node with the given score semantics."""

    def __init__(self, *, Dv=D, alibi=True, softcap=None, causal=True, window=None, slopes_grad=False):
        super().__init__()
        self.Dv, self.causal, self.window, self.softcap = Dv, causal, window, softcap
        self.qk = nn.Linear(C, 2 * H * D)
        self.v = nn.Linear(C, H * Dv)
        self.out = nn.Linear(H * Dv, C)
        slopes = torch.tensor([2 ** (-2 * (h + 1)) for h in range(H)])
        if slopes_grad:
            self.slopes = nn.Parameter(slopes)
        else:
            self.register_buffer("slopes", slopes if alibi else None)

    def forward(self, x):
        q, k = self.qk(x).view(B, S, 2, H, D).transpose(1, 3).unbind(2)      # [B, H, S, D]
        v = self.v(x).view(B, S, H, self.Dv).transpose(1, 2)                 # [B, H, S, Dv]
        spec = AttentionSpec.of(causal=self.causal, window=self.window, scale=D ** -0.5,
                                alibi=self.slopes is not None, softcap=self.softcap)
        o = canonical_attention(q, k, v, spec.encode(), None, None, self.slopes)
        return self.out(o.transpose(1, 2).reshape(B, S, H * self.Dv))


class DropoutSDPA(nn.Module):
    """SDPA whose dropout_p is a forward argument: under dynamic=True a traced scalar."""

    def __init__(self, Dv=D):
        super().__init__()
        self.Dv = Dv
        self.qk = nn.Linear(C, 2 * H * D)
        self.v = nn.Linear(C, H * Dv)

    def forward(self, x, p):
        q, k = self.qk(x).view(B, S, 2, H, D).transpose(1, 3).unbind(2)
        v = self.v(x).view(B, S, H, self.Dv).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True).sum(1)


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _run(make, args, *, dynamic=False, schedule="zigzag"):
    torch.manual_seed(0)
    m, ref = make(), make()
    ref.load_state_dict(m.state_dict())
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, sp.stats() as st:
        warnings.simplefilter("always")
        try:
            out = torch.compile(m, backend=sp.backend(inner="aot_eager", schedule=schedule), dynamic=dynamic)(*args)
        except Exception as e:  # noqa: BLE001
            return {"error": f"{type(e).__name__}: {e}"}
        out.pow(2).sum().backward()
    r = ref(*args)
    r.pow(2).sum().backward()
    return {"error": None, "out": _rel(out, r),
            "grads": {n: _rel(p.grad, q.grad) for (n, p), q in zip(m.named_parameters(), ref.parameters())},
            "ring_calls": st.attention_forward_calls,
            # fallbacks only (the gathered-output note is not one: these modules return their outputs)
            "warnings": [str(w.message) for w in caught if "seqpar: cannot shard" in str(w.message)]}


def _x():
    return torch.randn(B, S, C, generator=torch.Generator().manual_seed(7))


def rule_cases(rank, P):
    x = _x()
    return {
        "alibi-causal": _run(lambda: CanonicalAttention(), (x,)),
        "alibi-softcap-dv12-striped": _run(lambda: CanonicalAttention(Dv=12, softcap=2.0), (x,), schedule="striped"),
        "alibi-bidirectional": _run(lambda: CanonicalAttention(causal=False), (x,)),
        "softcap-window-distflash": _run(lambda: CanonicalAttention(alibi=False, softcap=2.0, window=6), (x,),
                                         schedule="distflash"),
        "slopes-with-grad": _run(lambda: CanonicalAttention(slopes_grad=True), (x,)),
        "sdpa-dv12": _run(lambda: DropoutSDPA(Dv=12), (x, 0.0)),
        "sdpa-dropout-traced-zero": _run(lambda: DropoutSDPA(), (x, 0.0), dynamic=True),
        "sdpa-dropout-traced-nonzero": _run(lambda: DropoutSDPA(), (x, 0.1), dynamic=True),
    }
