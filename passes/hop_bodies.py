"""Open the higher-order-op bodies Dynamo wraps around the user's checkpointed code.

``torch.utils.checkpoint(block, x, use_reentrant=False)`` (and Hugging Face's
``gradient_checkpointing_enable()``) reaches the backend as one
``torch.ops.higher_order.tag_activation_checkpoint(wrap_body_k, *args)`` node whose body is a
separate graph module; ``wrap(body, *args)`` likewise. The passes walk one flat graph, so
attention inside a body was invisible: the whole region ran replicated.

Design (why inline and not recurse): torch itself never executes the checkpoint HOP as a
region under ``torch.compile``. Its implementation runs the body once and *tags* every op with
``node.meta["recompute"]`` (a ``CheckpointPolicy``) and ``node.meta["ac_graph_id"]``; the
min-cut partitioner does the actual recomputation from the tags. So a body inlined into the
parent graph whose nodes carry the same two tags means exactly what the HOP means, and every
pass (mask proofs across the region boundary, entry shards, sharding rules, remat) sees one
flat graph. The tags travel through aot_autograd on their own: ``recompute`` and
``ac_graph_id`` are in ``torch.fx.proxy._COPY_META_FIELDS``, which aot_autograd's interpreter
copies onto every ATen node it traces from a Dynamo node; ``rewrite`` copies them from each
Dynamo node onto the nodes its rule emits (``copy_region_meta``).

Reads: the graph's ``tag_activation_checkpoint`` / ``wrap`` nodes and their body modules.
Writes: inlined nodes with ``meta["recompute"]`` (vanilla checkpoint: ``PREFER_RECOMPUTE``),
``meta["ac_graph_id"]`` and, for a selective-checkpoint body (``context_fn``), the region's
``context_fn`` in ``USER_POLICIES`` keyed by its ``ac_graph_id`` (the partitioner evaluates
the user's policy per ATen op: ``checkpointing.apply_user_policies``).
"""
from __future__ import annotations

import itertools
import operator
from typing import Callable

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from .alias_sets import eliminate_dead_code

__all__ = ["REGION_META", "USER_POLICIES", "copy_region_meta", "inline_hop_bodies"]

# The meta fields that make a node part of a user's checkpointed region.
REGION_META = ("recompute", "ac_graph_id")

# ac_graph_id -> the user's selective-checkpoint context_fn (from ``checkpoint(..., context_fn=)``)
USER_POLICIES: dict[int, Callable] = {}

# Ids of regions opened here; far from torch's own counter (``wrap.uid``, from 1) for readable dumps.
_region_ids = itertools.count(1_000_000)


def _hops() -> dict:
    hop = torch.ops.higher_order
    out = {}
    if hasattr(hop, "tag_activation_checkpoint"):
        out[hop.tag_activation_checkpoint] = "checkpoint"
    if hasattr(hop, "wrap"):
        out[hop.wrap] = "wrap"
    return out


def inline_hop_bodies(gm: fx.GraphModule) -> int:
    """Inline every checkpoint / wrap body of ``gm`` (nested bodies too), in place.

    Returns the number of regions opened. A body whose output is not a tuple of its results
    (never seen from Dynamo) is left alone; the replicated-attention report then names it.
    """
    hops = _hops()
    opened = 0
    changed = True
    while changed:                        # a body may itself hold a HOP: repeat until flat
        changed = False
        for node in list(gm.graph.nodes):
            kind = hops.get(node.target) if node.op == "call_function" else None
            if kind is None or not _inline_one(gm, node, kind):
                continue
            opened += 1
            changed = True
    if opened:
        eliminate_dead_code(gm.graph)
        gm.graph.lint()
        gm.recompile()
    return opened


def _inline_one(gm: fx.GraphModule, node: fx.Node, kind: str) -> bool:
    body_ref = node.args[0]
    if not (isinstance(body_ref, fx.Node) and body_ref.op == "get_attr"):
        return False
    body = getattr(gm, body_ref.target)
    if not isinstance(body, fx.GraphModule):
        return False
    out_node = next(n for n in body.graph.nodes if n.op == "output")
    results = out_node.args[0]
    if not isinstance(results, (tuple, list)):
        return False
    if any(not (u.op == "call_function" and u.target is operator.getitem) for u in node.users):
        return False
    # a wrap inside a checkpointed region stays in that region
    tags: dict = {k: node.meta[k] for k in REGION_META if k in node.meta}
    if kind == "checkpoint":
        region = next(_region_ids)
        tags = {"recompute": CheckpointPolicy.PREFER_RECOMPUTE, "ac_graph_id": region}
        context_fn = body.meta.get("_checkpoint_context_fn") if hasattr(body, "meta") else None
        if context_fn is None:
            context_fn = node.kwargs.get("context_fn")
        if context_fn is not None:
            USER_POLICIES[region] = context_fn
    env: dict[fx.Node, fx.Node] = {}
    args = list(node.args[1:])
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_before(node):
        for ph, arg in zip(placeholders, args):
            env[ph] = arg
        for inner in body.graph.nodes:
            if inner.op in ("placeholder", "output"):
                continue
            if inner.op == "get_attr":     # a nested body or constant: move it onto the parent
                name = _fresh_attr(gm, inner.target)
                setattr(gm, name, getattr(body, inner.target))
                new = gm.graph.get_attr(name)
                new.meta.update(inner.meta)
            else:
                new = gm.graph.node_copy(inner, lambda n: env[n])
            for key in REGION_META:         # the innermost checkpoint region wins
                if key in tags:
                    new.meta[key] = tags[key]
            env[inner] = new
    for user in list(node.users):
        i = user.args[1]
        value = results[i]
        user.replace_all_uses_with(env[value] if isinstance(value, fx.Node) else value)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    if not body_ref.users:
        gm.graph.erase_node(body_ref)
    return True


def _fresh_attr(gm: fx.GraphModule, base: str) -> str:
    name, i = f"{base}_inlined", 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_inlined_{i}"
    return name


def copy_region_meta(old: fx.Node, last_before: fx.Node, graph: fx.Graph) -> None:
    """Give the nodes ``rewrite`` emitted for ``old`` (every node after ``last_before``) the
    checkpoint region of ``old``: the local ops of a checkpointed op are checkpointed alike."""
    if "ac_graph_id" not in old.meta:
        return
    node = last_before.next
    while node is not graph._root:
        for key in REGION_META:
            if key in old.meta and key not in node.meta:
                node.meta[key] = old.meta[key]
        node = node.next
