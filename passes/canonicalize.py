"""Find the attention of a graph and the sequence length it runs over.

Reads Dynamo's ``node.meta["example_value"]``; writes ``node.meta["seqpar_attention"] = True`` on
every ``F.scaled_dot_product_attention`` call and every ``canonical_attention`` node that
``attention_patterns`` made of hand-written attention.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["find_attention", "sequence_length"]

from .attention_patterns import canonical_attention

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention, canonical_attention)


def find_attention(gm: fx.GraphModule) -> list[fx.Node]:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _SDPA]
    for n in nodes:
        n.meta["seqpar_attention"] = True
    return nodes


def sequence_length(attention: list[fx.Node]) -> int | None:
    """The common query/key length of all self-attention calls, or None if they differ."""
    lengths = set()
    for n in attention:
        q, k = n.args[0].meta["example_value"], n.args[1].meta["example_value"]
        if q.dim() < 2 or k.dim() < 2 or q.shape[-2] != k.shape[-2]:
            return None
        lengths.add(int(q.shape[-2]))
    return lengths.pop() if len(lengths) == 1 else None
