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


def sequence_length(attention: list[fx.Node], prefer: int | None = None) -> int | None:
    """The sequence length to split: the query/key length of the self-attention calls (query and
    key of one length). Several lengths (an encoder-decoder whose target is shorter than its
    source): ``prefer`` (the length of the shards the frame received) when it is one of them,
    else the longest — the encoder's, where long context costs — and the other attention calls
    (the decoder's, the cross-attention) run replicated, said by the replicated-attention report.
    None when there is no self-attention."""
    lengths = set()
    for n in attention:
        q, k = n.args[0].meta["example_value"], n.args[1].meta["example_value"]
        if q.dim() >= 2 and k.dim() >= 2 and q.shape[-2] == k.shape[-2]:
            lengths.add(int(q.shape[-2]))
    if not lengths:
        return None
    return prefer if prefer in lengths else max(lengths)
