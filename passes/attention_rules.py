"""Sharding rules of attention: SDPA and the canonical attention node become the ring op.

q, k, v must all be Shard(2) ([B, H, S, D] with the sequence sharded); under autocast the inputs
are cast to the dtype the traced attention produced (the ring op is not autocast-aware).
"""
from __future__ import annotations

import operator

import torch

import seqpar_compiler.runtime  # noqa: F401  (registers the seqpar ops)

from .placement import Shard
from .rewrite import _source_line, call_arguments

__all__ = ["sdpa_rule", "canonical_attention_rule"]


def _ring(ctx, node, q, k, v, doc_local, scale: float, causal: bool, window):
    """Emit the ring op for attention ``node`` of (old) q, k, v → (new node, Shard(2))."""
    dtype = ctx.example(node).dtype
    qkv = [ctx.env[t] if ctx.example(t).dtype == dtype else
           ctx.emit("to", (ctx.env[t], dtype), op="call_method", placement=Shard(2)) for t in (q, k, v)]
    out = ctx.emit(torch.ops.seqpar.ring_attention.default,
                   (*qkv, doc_local, float(scale), bool(causal), window, ctx.schedule, ctx.group_name,
                    ctx.overlap, ctx.kernel))
    return ctx.emit(operator.getitem, (out, 0), placement=Shard(2)), Shard(2)


def _all_sharded(ctx, q, k, v) -> bool:
    return all(ctx.shard_of(t) == Shard(2) and ctx.example(t).dim() == 4 for t in (q, k, v))


def sdpa_rule(ctx, node):
    """F.scaled_dot_product_attention without a mask (masked ones were canonicalised if provable)."""
    a = call_arguments(node, ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"],
                       {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False})
    if a["dropout_p"]:
        raise ValueError(f"seqpar: attention dropout p={a['dropout_p']} is not supported yet (no per-block RNG); "
                         f"use dropout_p=0 in attention ({_source_line(node)})")
    if not _all_sharded(ctx, a["query"], a["key"], a["value"]):
        return "attention whose q/k/v are not all [B, H, S, D] sharded along the sequence"
    if a["attn_mask"] is not None:
        return "an explicit attention mask that is not provably causal, a window or documents"
    scale = a["scale"] if a["scale"] is not None else ctx.example(a["query"]).shape[-1] ** -0.5
    return _ring(ctx, node, a["query"], a["key"], a["value"], None, scale, a["is_causal"], None)


def canonical_attention_rule(ctx, node):
    """canonical_attention(q, k, v, causal, window, doc_ids, scale) from a proved mask."""
    q, k, v, causal, window, doc, scale = node.args
    if not _all_sharded(ctx, q, k, v):
        return "attention whose q/k/v are not all [B, H, S, D] sharded along the sequence"
    doc_local = None
    if doc is not None:
        if ctx.example(doc).shape[0] != ctx.example(q).shape[0]:
            return "document ids with another batch size than the queries"
        if ctx.shard_of(doc) not in (None, Shard(1)):
            return "document ids sharded unlike the queries"
        doc_local = ctx.local(doc, 1)
    return _ring(ctx, node, q, k, v, doc_local, scale, causal, window)
