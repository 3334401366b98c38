"""Lookups of per-token indices built at full length (not from the user's input) on spawned
ranks, against one process's eager run in float64.

Each model embeds the user's ids (which shards the sequence), adds a table looked up from
indices the model makes itself at full length, and runs causal attention so the frame is
sharded: BERT's buffers (``position_ids[:, :S]``, token types gathered from a buffer and
expanded to ``[B, S]``), OPT's positions from a cumsum of a mask of ones with a cast and a scale
after the lookup, and a parameter indexed directly (``table[positions]``). Compiled with
``aot_eager``; each case returns the relative errors ``||x − ref|| / ||ref||`` of the output
(a scalar loss) and of every gradient, the seqpar warnings, and the all-gathers of
activations in the step.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import seqpar_compiler as sp
from step_probes import SequenceGatherCounter, grad_errors

__all__ = ["MODELS", "run_cases"]

B, D, H, V, MAX = 2, 8, 2, 16, 64


class _Attend(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, h, w):                                     # h, w: [B, S, D]; a scalar loss
        q, k, v = self.qkv(h).view(h.shape[0], h.shape[1], 3, H, D // H).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(h.shape)
        return (a * w).sum()


class BufferSlices(nn.Module):
    """BERT's embeddings: positions sliced from a buffer, token types gathered from a zero buffer
    by those positions and expanded to the batch."""

    def __init__(self):
        super().__init__()
        self.words, self.pos, self.types = nn.Embedding(V, D), nn.Embedding(MAX, D), nn.Embedding(2, D)
        self.register_buffer("position_ids", torch.arange(MAX).expand((1, -1)), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(1, MAX, dtype=torch.long), persistent=False)
        self.attend = _Attend()

    def forward(self, ids, w):                                      # ids: [B, S]
        S = ids.shape[1]
        position_ids = self.position_ids[:, :S]                  # [1, S]
        types = torch.gather(self.token_type_ids.expand(position_ids.shape[0], -1), 1, position_ids)
        types = types.expand(ids.shape[0], S)                    # [B, S]
        h = self.words(ids) + self.types(types)
        h = h + self.pos(position_ids)
        return self.attend(h, w)


class CumsumPositions(nn.Module):
    """OPT's learned positions: a cumsum of a mask of ones, offset, looked up, cast and scaled."""

    def __init__(self):
        super().__init__()
        self.words, self.pos = nn.Embedding(V, D), nn.Embedding(MAX + 2, D)
        self.scale = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.attend = _Attend()

    def forward(self, ids, w):
        h = self.words(ids)
        mask = torch.ones(ids.shape[0], ids.shape[1], device=ids.device)
        positions = (torch.cumsum(mask, dim=1) * mask - 1).long()  # [B, S]
        pos = self.pos(positions + 2).to(h.dtype) * self.scale
        return self.attend(h + pos, w)


class IndexedTable(nn.Module):
    """A parameter indexed by positions the model makes at full length (``table[positions]``)."""

    def __init__(self):
        super().__init__()
        self.words = nn.Embedding(V, D)
        self.table = nn.Parameter(torch.randn(MAX, D, dtype=torch.float64))
        self.register_buffer("offsets", torch.arange(MAX).flip(0), persistent=False)
        self.attend = _Attend()

    def forward(self, ids, w):
        positions = self.offsets[-ids.shape[1]:]                 # [S], a full-length index
        return self.attend(self.words(ids) + self.table[positions], w)


MODELS = {"buffer_slices": BufferSlices, "cumsum_positions": CumsumPositions, "indexed_table": IndexedTable}


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    n = float(b.norm())
    return float((a - b).norm()) / (n if n else 1.0)


def _case(rank: int, P: int, name: str, schedule: str, S: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[name]().double()
    ref_model = copy.deepcopy(model)
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    w = torch.randn(B, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = ref_model(ids, w)
    ref.backward()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=sp.backend(inner="aot_eager", schedule=schedule))
    with warnings.catch_warnings(record=True) as caught, SequenceGatherCounter() as gathers:
        warnings.simplefilter("always")
        out = compiled(ids, w)
        out.backward()
    grads, missing = grad_errors(model, ref_model)
    return {"out": _rel(out, ref), "grads": grads, "missing": missing, "gathers": gathers.calls,
            "warnings": [str(m.message) for m in caught if "seqpar" in str(m.message)]}


def run_cases(rank: int, P: int, cases: list) -> dict:
    return {case: _case(rank, P, *case) for case in cases}
