"""Make replicated-use gradients partial under ``SEQPAR_GRAD_REDUCE=none``.

The recipe for ``none`` (docs/training.md) (a data-parallel wrapper over dp × sp ranks sums every
gradient; the sequence loss is multiplied by sp) needs every gradient partial on every rank.
``rewrite`` leaves uses that meet shards partial. A value computed only from replicated inputs
(a parameter, ``gain ** 2``) that flows into a value computed from shards (the all-reduced loss,
a gathered fallback) gets the same whole gradient on every rank: the wrapper's sum would count
it sp times (found with a model returning ``ce + gain ** 2``: gain's gradient sp× too large).
This pass puts ``share_grad_over_group`` (gradient ÷ P) on each such edge.

It assumes, as ``none`` does everywhere, that the frame's replicated outputs receive the same
whole cotangent on every rank (a loss): a replicated output used by a later frame's sharded
computation is not that case. Outputs that are purely replicated are left alone.

Reads: ``meta["seqpar_placement"]`` (Shard marks sequence-sharded values) and the placeholders'
``meta["example_value"]`` (``requires_grad``). Writes: ``share_grad_over_group`` nodes before
the consumers; returns how many.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from seqpar_compiler.runtime.grad_share import share_grad_over_group

from .placement import Replicate, Shard

__all__ = ["share_replicated_gradients"]


def share_replicated_gradients(gm: fx.GraphModule, group_name: str) -> int:
    """Insert gradient ÷ P on every edge from a purely replicated value that needs a gradient
    into a replicated value computed from shards; returns the number of edges."""
    from_shards: set[fx.Node] = set()
    needs_grad: set[fx.Node] = set()
    edges: list[tuple[fx.Node, fx.Node]] = []
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        inputs = node.all_input_nodes
        placement = node.meta.get("seqpar_placement")
        if _sharded(placement) or any(a in from_shards for a in inputs):
            from_shards.add(node)
        if _requires_grad(gm, node) or any(a in needs_grad for a in inputs):
            needs_grad.add(node)
        if node in from_shards and isinstance(placement, Replicate):
            edges += [(a, node) for a in dict.fromkeys(inputs) if a in needs_grad and a not in from_shards]
    shared: dict[fx.Node, fx.Node] = {}
    for src, dst in edges:
        if src not in shared:
            with gm.graph.inserting_after(src):
                shared[src] = gm.graph.call_function(share_grad_over_group, (src, group_name))
            shared[src].meta.update(src.meta)
            shared[src].meta["seqpar_placement"] = Replicate()
        dst.replace_input_with(src, shared[src])
    if edges:
        gm.graph.lint()
        gm.recompile()
    return len(edges)


def _sharded(placement) -> bool:
    if isinstance(placement, tuple):
        return any(isinstance(p, Shard) for p in placement)
    return isinstance(placement, Shard)


def _requires_grad(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "placeholder":
        ex = node.meta.get("example_value", node.meta.get("val"))
        return isinstance(ex, torch.Tensor) and ex.requires_grad
    if node.op == "get_attr":
        value = getattr(gm, str(node.target), None) if "." not in str(node.target) else None
        return isinstance(value, torch.Tensor) and value.requires_grad
    return False
