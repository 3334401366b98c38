"""Slice a replicated lookup at its indices: a value looked up from per-token indices of the
whole sequence (a learned position or token-type embedding) that meets sequence shards is
computed from this rank's indices instead of being computed whole and sliced.

Models build such indices at full length from something that is not the user's input (BERT:
``self.position_ids[:, :S]`` and a buffer of token-type ids expanded to ``[B, S]``; OPT: a cumsum
of a mask of ones), so nothing shards them before their lookup. Slicing the lookup's output
(``ShardingContext.local``) is correct, but its backward all-gathers a ``[B, S, H]`` gradient of
the whole sequence every step, and no fallback is said since nothing ran replicated that
needed the gather. Slicing the indices instead costs nothing either way (integers have no
gradient); the lookup and its backward are then local, and the table's gradient is partial on
each rank and summed over the group like any replicated weight's (``ShardingContext.weight``).

Sliced at the indices (``local_at_source``), for a value that needs a gradient:
  * ``F.embedding(idx, table)``, ``table[idx]``: ``idx`` an integer tensor whose dim of the
    sequence is the output's;
  * a pointwise op (``pos.to(dtype)``, ``emb * scale``, ``tok + pos``) whose operands with the
    sequence dim are themselves sliced at their indices or need no gradient.
Anything else returns ``None`` and the caller slices the output as before.

Reads: ``meta["example_value"]`` of the old graph and the context's placements. Writes: new
nodes in the context's graph, placed ``Shard(dim)``.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .placement import Replicate, Shard

__all__ = ["local_at_source"]


def local_at_source(ctx, old: fx.Node, dim: int) -> fx.Node | None:
    """This rank's rows (``dim``) of the replicated ``old``, computed from sliced indices, or
    ``None`` when ``old`` is not such a lookup (the caller then slices ``old`` itself)."""
    if not _sliceable(ctx, old, dim):
        return None
    key = (old, dim)
    if key not in ctx.sourced:
        ctx.sourced[key] = _emit(ctx, old, dim)
    return ctx.sourced[key]


def _needs_grad(ex) -> bool:
    return isinstance(ex, torch.Tensor) and ex.requires_grad


def _lookup_indices(ctx, node: fx.Node):
    """(indices, table) of an embedding-like lookup whose rows follow its integer indices."""
    if node.op == "call_function" and node.target is F.embedding:
        idx = node.kwargs.get("input", node.args[0] if node.args else None)
        table = node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
        return idx, table
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        table, idx = node.args
        if isinstance(idx, fx.Node) and isinstance(table, fx.Node):
            return idx, table
    return None, None


def _integer(ex) -> bool:
    return isinstance(ex, torch.Tensor) and not ex.is_floating_point() and not ex.is_complex() \
        and ex.dtype is not torch.bool


def _sliceable(ctx, old, dim: int, depth: int = 0) -> bool:
    """True if ``old`` (replicated, needing a gradient) can be computed on this rank's rows
    from sliced indices with no gradient of the whole sequence left to gather."""
    if not isinstance(old, fx.Node) or depth > 8 or old.op not in ("call_function", "call_method"):
        return False
    ex = ctx.example(old)
    if not _needs_grad(ex) or not isinstance(ctx.placement_of(old), Replicate) or dim >= ex.dim() \
            or ex.shape[dim] != ctx.S:
        return False
    if ctx.facts is not None and ctx.facts.key_of(old) is not None:
        return False                      # a written storage: recomputing it would miss the write
    idx, table = _lookup_indices(ctx, old)
    if idx is not None:
        iex, tex = ctx.example(idx), ctx.example(table)
        return (_integer(iex) and isinstance(tex, torch.Tensor) and dim < iex.dim() and iex.shape[dim] == ctx.S
                and isinstance(ctx.placement_of(idx), Replicate) and isinstance(ctx.placement_of(table), Replicate)
                and ex.dim() == iex.dim() + tex.dim() - 1)
    if not _is_pointwise(old) or old.target in _RANDOM:
        return False                      # a dropout recomputed on the rows would draw another mask
    found = False
    for a in old.all_input_nodes:
        aex = ctx.example(a)
        if not isinstance(aex, torch.Tensor) or not isinstance(ctx.placement_of(a), Replicate):
            return False
        ad = dim - (ex.dim() - aex.dim())
        if ad < 0 or aex.shape[ad] == 1:
            continue                      # broadcast along the sequence: a weight
        if aex.shape[ad] != ctx.S:
            return False
        if _needs_grad(aex):
            if not _sliceable(ctx, a, ad, depth + 1):
                return False
            found = True
    return found


_RANDOM = {F.dropout, F.alpha_dropout, F.feature_alpha_dropout, torch.dropout, torch.bernoulli}


def _is_pointwise(node: fx.Node) -> bool:
    from .sharding_rules import RULES, _aten_pointwise, _pointwise, rule_key
    rule = RULES.get(rule_key(node))
    return rule is _pointwise or (rule is None and _aten_pointwise(node))


def _emit(ctx, old: fx.Node, dim: int) -> fx.Node:
    ex = ctx.example(old)
    idx, table = _lookup_indices(ctx, old)
    if idx is not None:
        local_idx = ctx.local(idx, dim)          # integers: a plain slice, nothing to gather back
        if old.target is F.embedding:
            rest = {k: v for k, v in old.kwargs.items() if k not in ("input", "weight")}
            args = (local_idx, ctx.weight(table), *old.args[2:])
            return ctx.emit(F.embedding, args, rest, Shard(dim))
        return ctx.emit(operator.getitem, (ctx.weight(table), local_idx), placement=Shard(dim))

    def operand(a):
        aex = ctx.example(a)
        if not isinstance(aex, torch.Tensor):
            return ctx.env[a]
        ad = dim - (ex.dim() - aex.dim())
        if ad < 0 or aex.shape[ad] == 1:
            return ctx.weight(a)
        return ctx.local(a, ad)                  # sliced at its own indices where it needs a gradient
    args = fx.node.map_arg(old.args, operand)
    kwargs = fx.node.map_arg(old.kwargs, operand)
    return ctx.emit(old.target, args, kwargs, Shard(dim), op=old.op)
