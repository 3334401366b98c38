"""Learned score biases of the offset: an embedding looked up at a function of k − q (T5).

T5's relative-position bias adds ``W[bucket(j − i), h]`` to the scores ``[b, h, i, j]``, with
``W [num_buckets, H]`` a parameter: per head a function of the offset j − i, which the ring
evaluates per block from a ``[H, 2S − 1]`` table (``AttentionSpec.rel_bias``). Proved by value
as the fixed biases are (``score_bias``), the table would be a constant and W's gradient lost.
Here it stays a function of W in the graph, ``embedding(g, W)ᵀ`` with ``g [2S − 1]`` the index
of each offset, so W's gradient flows back through the ring's table gradient. No S×S tensor is
left: the lookup at ``[S, S]`` indices dies with the attention it fed.

Accepted only when, evaluated at the global length:
  * the term is reached from one lookup ``embedding(idx, W)`` / ``W[idx]`` (W requires grad,
    ``idx [S, S]`` integer and static: computed from positions, constants and buffers) through
    layout ops only (permute, transpose, unsqueeze, expand, view, reshape, contiguous, casts,
    basic indexing);
  * ``idx[i, j]`` depends on j − i alone (``idx[i, j] = g[j − i + S − 1]``);
  * with W replaced by distinct random values W', the term evaluates to exactly
    ``W'[idx[i, j], h]`` at every ``[b, h, i, j]``: the layout ops put the lookup's last dim on
    the heads and nothing else (they are linear and value-preserving, so one evaluation proves
    the map for every W).

Reads the Dynamo graph and its placeholders' values; writes nothing (``attention_patterns``
emits the table).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .mask_proof import evaluate, example, is_call, user_dependent

__all__ = ["LearnedTable", "learned_offset_table"]

_LAYOUT_METHODS = {"permute", "transpose", "unsqueeze", "expand", "view", "reshape", "contiguous", "to", "float",
                   "type", "half", "bfloat16", "double"}
_LAYOUT_FNS = {torch.permute, torch.transpose, torch.unsqueeze, torch.reshape}


@dataclass
class LearnedTable:
    """A learned per-head function of the offset: ``table[h, o] = weight[index[o], h]`` for
    offsets o = j − i + S − 1 in [0, 2S − 1), in ``dtype`` (the term's)."""

    weight: fx.Node
    index: torch.Tensor          # [2S - 1] int64
    dtype: torch.dtype


def _lookup(node: fx.Node):
    """(indices node, weight node) of a plain embedding lookup, or None. Refused: a padding index
    (its row gets no gradient), ``max_norm`` (renormalizes the weight in place) and
    ``scale_grad_by_freq`` (scales the gradient by how often an index occurs: S × S lookups and
    the table's 2S − 1 do not count alike)."""
    if is_call(node, fns={F.embedding}):
        names = ["input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"]
        a = {**dict(zip(names, node.args)), **node.kwargs}
        if a.get("padding_idx") is not None or a.get("max_norm") is not None or a.get("scale_grad_by_freq"):
            return None
        return a.get("input"), a.get("weight")
    if is_call(node, fns={torch.embedding}):
        names = ["weight", "indices", "padding_idx", "scale_grad_by_freq", "sparse"]
        a = {**dict(zip(names, node.args)), **node.kwargs}
        if a.get("padding_idx", -1) not in (None, -1) or a.get("scale_grad_by_freq"):
            return None
        return a.get("indices"), a.get("weight")
    if is_call(node, fns={operator.getitem}) and isinstance(node.args[1], fx.Node):
        return node.args[1], node.args[0]
    return None


def _walk_to_lookup(node: fx.Node) -> fx.Node | None:
    """The lookup ``node`` is reached from through layout ops only, or None."""
    for _ in range(16):
        if _lookup(node) is not None:
            return node
        if node.op == "call_method" and node.target in _LAYOUT_METHODS:
            if any(isinstance(a, fx.Node) for a in node.args[1:]) or any(
                    isinstance(a, fx.Node) for a in node.kwargs.values()):
                return None
            node = node.args[0]
        elif node.op == "call_function" and node.target in _LAYOUT_FNS:
            node = node.args[0]
        elif is_call(node, fns={operator.getitem}) and not any(isinstance(a, fx.Node) for a in _flat(node.args[1])):
            node = node.args[0]                        # x[None], x[:, :s]: basic indexing
        else:
            return None
        if not isinstance(node, fx.Node):
            return None
    return None


def _flat(index) -> list:
    return list(index) if isinstance(index, (tuple, list)) else [index]


def _offset_index(idx: torch.Tensor, S: int) -> torch.Tensor | None:
    """g [2S − 1] with ``idx[i, j] = g[j − i + S − 1]``, or None when idx is no function of j − i."""
    if idx.shape != (S, S) or idx.is_floating_point():
        return None
    g = torch.cat([idx[1:, 0].flip(0), idx[0]]).long()                    # offsets −(S−1) .. S−1
    offset = torch.arange(S)[None, :] - torch.arange(S)[:, None] + S - 1
    return g if torch.equal(g[offset], idx.long()) else None


def learned_offset_table(term: fx.Node, gm: fx.GraphModule, values: dict, static_inputs: set,
                         shape: tuple) -> LearnedTable | None:
    """The learned table of an additive score term broadcastable to ``shape`` [B, H, S, S], or
    None when the term is not a learned function of the offset (module docstring)."""
    B, H, S, _ = shape
    lookup = _walk_to_lookup(term)
    if lookup is None:
        return None
    idx, weight = _lookup(lookup)
    ew, ei = example(weight), example(idx)
    if not (isinstance(weight, fx.Node) and isinstance(idx, fx.Node) and isinstance(ew, torch.Tensor)
            and ew.requires_grad and ew.dim() == 2 and ew.shape[1] == H and isinstance(ei, torch.Tensor)
            and not ei.requires_grad and not user_dependent(idx, static_inputs)
            and not user_dependent(weight, static_inputs)):
        return None
    index = _offset_index(evaluate(gm, idx, values), S)
    if index is None:
        return None
    # distinct values (exact in any float dtype for a small weight): equality proves the map
    probe = torch.randperm(ew.numel(), generator=torch.Generator().manual_seed(0)).reshape(ew.shape).to(ew.dtype)
    got = evaluate(gm, term, values, substitute={weight: probe.to(ew.device)}).cpu()
    offset = torch.arange(S)[None, :] - torch.arange(S)[:, None] + S - 1
    want = probe[index[offset]].permute(2, 0, 1).to(got.dtype)           # [H, S, S]
    try:
        got = got.broadcast_to(shape)
    except RuntimeError:
        return None
    if not torch.equal(got, want[None].expand(shape)):
        return None
    return LearnedTable(weight, index, example(term).dtype)
