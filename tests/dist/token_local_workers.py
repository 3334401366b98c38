"""Mixture-of-experts routing written the ways real code writes it, on spawned ranks: each case is
a small attention + MoE block run through seqpar and compared with the same block in one
process. Returns the relative errors, the ring calls and the seqpar warnings."""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import seqpar_compiler as sp

S, B, D, E, K = 32, 2, 16, 4, 2


def _grouped_mm(x, w, offs):
    from transformers.integrations.moe import _grouped_mm as hf_grouped_mm   # CPU: transformers' fallback op
    return hf_grouped_mm(x, w, offs=offs)


class _MoEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.router = nn.Linear(D, E, bias=False)
        self.up = nn.Parameter(torch.randn(E, D, 2 * D) * 0.2)
        self.down = nn.Parameter(torch.randn(E, 2 * D, D) * 0.2)

    def forward(self, x):
        q, k, v = (t.view(B, S, 2, D // 2).transpose(1, 2) for t in self.qkv(x).split(D, -1))
        h = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, D)
        flat = h.reshape(-1, D)                                     # [B·S, D]: tokens merged
        weights, experts = torch.topk(self.router(flat).softmax(-1), K, dim=-1)
        return (h + self.experts(flat, experts, weights).view(B, S, D)).pow(2).mean()


class SortGroupedInverseByArange(_MoEBlock):
    """transformers' grouped_mm path: sort the (token, slot) entries by expert, gather rows,
    grouped matmul with offsets from a histogram, inverse permutation by ``inv[perm] = arange``."""

    def experts(self, flat, experts, weights):
        ids, perm = torch.sort(experts.reshape(-1))
        rows = flat[perm // K]
        w = weights.reshape(-1)[perm]
        offs = torch.cumsum(torch.histc(ids.float(), bins=E, min=0, max=E - 1), dim=0, dtype=torch.int32)
        out = _grouped_mm(F.silu(_grouped_mm(rows, self.up, offs)), self.down, offs) * w.unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.size(0), device=perm.device)
        return out[inv].view(-1, K, D).sum(1)


class ArgsortGroupedInverseByArgsort(_MoEBlock):
    """The same with ``argsort`` and the inverse as ``argsort(perm)`` (histc, not bincount: a
    bincount's size depends on the data, which breaks Dynamo's graph there)."""

    def experts(self, flat, experts, weights):
        perm = torch.argsort(experts.reshape(-1), stable=True)
        rows = flat[perm // K]
        counts = torch.histc(experts.reshape(-1)[perm].float(), bins=E, min=0, max=E - 1)
        offs = torch.cumsum(counts, dim=0).to(torch.int32)
        out = _grouped_mm(F.gelu(_grouped_mm(rows, self.up, offs)), self.down, offs)
        out = out * weights.reshape(-1)[perm].unsqueeze(-1)
        return out[torch.argsort(perm)].view(-1, K, D).sum(1)


class CapacityLimited(_MoEBlock):
    """Each expert keeps at most 20 entries, counted in the sorted order over all tokens: which
    tokens are dropped depends on the global order, so the sort cannot run per rank."""

    def experts(self, flat, experts, weights):
        ids, perm = torch.sort(experts.reshape(-1), stable=True)
        first = torch.cumsum(F.one_hot(ids, E), dim=0)                      # running count per expert
        keep = (first.gather(1, ids.unsqueeze(1)).squeeze(1) <= 20).to(flat.dtype)
        rows = flat[perm // K]
        offs = torch.cumsum(torch.bincount(ids, minlength=E), dim=0).to(torch.int32)
        out = _grouped_mm(rows, self.up, offs)[:, :D] * (keep * weights.reshape(-1)[perm]).unsqueeze(-1)
        return out[torch.argsort(perm)].view(-1, K, D).sum(1)


CASES = {c.__name__: c for c in (SortGroupedInverseByArange, ArgsortGroupedInverseByArgsort, CapacityLimited)}


def _rel(a, b):
    if a is None:
        return float("inf")
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def moe_case(rank: int, P: int, name: str, **options) -> dict:
    torch.manual_seed(0)
    model, ref = CASES[name](), CASES[name]()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, sp.stats() as st:
        warnings.simplefilter("always")
        loss = torch.compile(model, backend=sp.backend(inner="aot_eager", schedule="zigzag", **options))(x)
        loss.backward()
    r = ref(x)
    r.backward()
    return {"loss": _rel(loss, r), "ring_calls": st.attention_forward_calls,
            "grads": {n: _rel(p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())
                      if q.grad is not None},
            "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)]}


def run_cases(rank: int, P: int, names: list) -> dict:
    return {n: moe_case(rank, P, n) for n in names}
