"""Random ops on shards of the sequence, on each spawned rank (test_random_ops.py).

One attention layer (so the frame is sequence-parallel) followed by a random op on its sharded
output. Every rank is seeded alike, as training scripts do; the cases return what the full value
looks like on this rank.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["run_cases"]

B, S, C, H = 2, 32, 16, 2


class _Attend(nn.Module):
    """qkv → causal SDPA → ``after`` (a random op on the [B, S, C] sharded output)."""

    def __init__(self, after):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.after = after

    def forward(self, x):
        q, k, v = self.qkv(x).view(B, S, 3, H, C // H).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, C)
        return self.after(a)


def _dropout(a):
    return F.dropout(torch.ones_like(a) + 0 * a, 0.5, training=True)


def _rand_like(a):
    return a + torch.rand_like(a)


def _drop_path(a):
    keep = a.new_empty(B, 1, 1).bernoulli_(0.5)            # per sample: must agree across ranks
    return a * keep


AFTER = {"dropout": _dropout, "rand_like": _rand_like, "drop_path": _drop_path}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _compiled(after):
    """The seeded module, its input, and the module compiled with seqpar (2-rank zigzag)."""
    import seqpar_compiler as sp
    torch.manual_seed(0)
    m = _Attend(after)
    x = torch.randn(B, S, C, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    return m, x, torch.compile(m, backend=sp.backend(inner="aot_eager", schedule="zigzag"))


def random_case(rank: int, P: int, name: str) -> dict:
    m, x, c = _compiled(AFTER[name])
    torch.manual_seed(123)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = c(x)
        out.sum().backward()
    grad = m.qkv.weight.grad.clone()
    torch.manual_seed(123)
    m.zero_grad()
    ref = m(x)                                          # one device, same seed
    ref.sum().backward()
    return {"full": _full(out).detach(), "ref": ref.detach(), "type": type(out).__name__,
            "grad": grad, "ref_grad": m.qkv.weight.grad.clone(),
            "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)]}


def eager_case(rank: int, P: int) -> dict:
    """Dropout and ``rand_like`` run eagerly on the frame's SequenceShard output (between frames)."""
    m, x, c = _compiled(lambda a: a)
    torch.manual_seed(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = c(x)
        dropped, noise = F.dropout(a, 0.5, training=True), torch.rand_like(a)
    torch.manual_seed(5)
    ref_a = m(x)
    ref_dropped, ref_noise = F.dropout(ref_a, 0.5, training=True), torch.rand_like(ref_a)
    return {"mask": _full(dropped).detach() == 0, "ref_mask": ref_dropped.detach() == 0,
            "noise": _full(noise), "ref_noise": ref_noise,
            "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)]}


def run_cases(rank: int, P: int, names: list[str]) -> dict:
    out = {n: random_case(rank, P, n) for n in names}
    out["eager"] = eager_case(rank, P)
    return out
