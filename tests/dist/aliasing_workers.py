"""In-place writes and aliases through seqpar, on spawned ranks: each case is a small attention
block that writes into a buffer, a slice or a view in one of the ways real model code does, run
through the backend and compared with the same module in one process.

Every case returns the relative errors of the output and of every parameter gradient (inf
where a gradient is missing), this rank's ring calls and the seqpar warnings.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))

import seqpar_compiler as sp  # noqa: E402

S, B, D, H = 32, 2, 16, 2


class _Block(nn.Module):
    """q/k/v projections and causal SDPA; ``build_kv`` is the part each case writes its own way."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.mlp = nn.Linear(D, D)

    def heads(self, t):                          # [B, S, D] -> [B, H, S, D/H]
        return t.view(B, -1, H, D // H).transpose(1, 2)

    def attend(self, q, k, v):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(B, -1, D))

    def forward(self, x):
        q, k, v = self.qkv(x).split(D, dim=-1)
        h = self.forward_case(x, self.heads(q), self.heads(k), self.heads(v))
        return h.pow(2).mean()


class NewEmptyCopySlices(_Block):
    """DeepSeek-V3's MLA: K assembled by ``copy_`` into the two halves of a ``new_empty`` buffer
    (the copies' results are unused: a dead-code elimination that thinks call_method is pure
    deletes them and K is read uninitialised)."""

    def forward_case(self, x, q, k, v):
        half = k.shape[-1] // 2
        key = k.new_empty(*k.shape)
        key[..., :half].copy_(k[..., :half])
        key[..., half:].copy_(k[..., half:] * 2)
        return self.attend(q, key, v)


class AddInPlaceIntoActivation(_Block):
    """Llama 4's MoE: the routed experts' sum enters through ``out.add_(...)`` on the shared
    expert's output; the result of ``add_`` is unused and ``out`` is returned."""

    def forward_case(self, x, q, k, v):
        out = self.attend(q, k, v)
        out.add_(self.mlp(x).repeat(2, 1, 1).view(2, B, -1, D).sum(0))
        return out


class SetitemAlongSequence(_Block):
    """A write into one position of the sequence (``h[:, 0] = 0``): no rank's shard can take it
    in place; the buffer must be computed whole so the write reaches every reader."""

    def forward_case(self, x, q, k, v):
        h = self.attend(q, k, v).clone()
        h[:, 0] = 0.0
        return self.mlp(h)


class InPlaceScanAlongSequence(_Block):
    """``h.cumsum_(1)`` in place along the sequence, then read through an earlier view."""

    def forward_case(self, x, q, k, v):
        h = self.attend(q, k, v).clone()
        view = h[..., :8]
        h.cumsum_(1)
        return self.mlp(h) + view.sum(-1, keepdim=True)


class WriteThroughViewSplittingSequence(_Block):
    """A write through a view that splits the sequence dim into rows of 4 tokens: every layout
    chunk holds whole rows, so each rank's rows are its own and the write stays on the shard."""

    def forward_case(self, x, q, k, v):
        h = self.attend(q, k, v).clone()
        grid = h.view(B, S // 4, 4, D)
        grid[:, :, 0].mul_(2.0)
        return self.mlp(h)


class WriteThroughViewStraddlingRanks(_Block):
    """A write through a view that splits the sequence into two rows of S/2 tokens: under
    zigzag (the test asks for it) each row lies on both ranks, so the rows are no rank's own."""

    def forward_case(self, x, q, k, v):
        h = self.attend(q, k, v).clone()
        grid = h.view(B, 2, S // 2, D)
        grid[:, :, 0].mul_(2.0)
        return self.mlp(h)


class SliceWriteAlongFeatures(_Block):
    """``h[..., :8] *= 2`` on a slice of the features (not the sequence): stays sharded."""

    def forward_case(self, x, q, k, v):
        h = self.attend(q, k, v).clone()
        h[..., :8] *= 2.0
        F.relu(h, inplace=True)
        return self.mlp(h)


class WriteIntoInput(nn.Module):
    """The frame writes into a user input (a running buffer the caller reads after the call)."""

    def __init__(self):
        super().__init__()
        self.block = SliceWriteAlongFeatures()

    def forward(self, x, record):
        record.copy_(x * 3.0)
        return self.block(x)


CASES = {cls.__name__: cls for cls in (NewEmptyCopySlices, AddInPlaceIntoActivation, SetitemAlongSequence,
                                       InPlaceScanAlongSequence, WriteThroughViewSplittingSequence,
                                       WriteThroughViewStraddlingRanks,
                                       SliceWriteAlongFeatures, WriteIntoInput)}


def _rel(a, b) -> float:
    if a is None:
        return float("inf")
    a, b = a.detach().double(), b.detach().double()
    n = (a - b).norm()
    return float(n / b.norm()) if b.norm() > 0 else float(n)


def alias_case(rank: int, P: int, name: str, **options) -> dict:
    torch.manual_seed(0)
    model, ref = CASES[name](), CASES[name]()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(1))
    args, ref_args = (x,), (x,)
    if name == "WriteIntoInput":
        args, ref_args = (x, torch.zeros(B, S, D)), (x, torch.zeros(B, S, D))
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, sp.stats() as st:
        warnings.simplefilter("always")
        loss = torch.compile(model, backend=sp.backend(inner="aot_eager", **options))(*args)
        loss.backward()
    ref_loss = ref(*ref_args)
    ref_loss.backward()
    out = {"loss": _rel(loss, ref_loss), "ring_calls": st.attention_forward_calls,
           "grads": {n: _rel(p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())
                     if q.grad is not None},
           "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)]}
    if name == "WriteIntoInput":
        out["input_write"] = _rel(args[1], ref_args[1])
    return out


def real_model_case(rank: int, P: int, name: str) -> dict:
    """The real transformers code of the two reported wrong-number models (real_model_zoo)."""
    from real_model_workers import real_model_case as run
    return run(rank, P, name)


def run_cases(rank: int, P: int, cases: list) -> dict:
    fns = {"alias": alias_case, "real": real_model_case}
    return {label: fns[kind](rank, P, **kw) for label, kind, kw in cases}
