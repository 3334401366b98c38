"""Sharding rules of attention: SDPA and the canonical attention node become the ring op.

q, k, v must all be Shard(2) ([B, H, S, D] / v [B, H, S, Dv] with the sequence sharded); under
autocast the inputs are cast to the dtype the traced attention produced (the ring op is not
autocast-aware). The canonical node's ``AttentionSpec`` goes to the ring op as it is (encoded);
its per-token data (document ids, key validity, [B, S]) is taken in the layout like any
replicated value (``ctx.local``: this rank's tokens, which then travel with their K/V), and its
ALiBi slopes [Hq] must be replicated (every rank holds all heads) and must not need a gradient
(the ring op has none for them): the ring evaluates the bias per block from global positions.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

import seqpar_compiler.runtime  # noqa: F401  (registers the seqpar ops)
from seqpar_compiler.kernels import AttentionSpec
from seqpar_compiler.runtime.layout import layout_of

from .attention_patterns import UNPROVED
from .placement import Replicate, Shard
from .rewrite import _source_line, call_arguments

__all__ = ["sdpa_rule", "canonical_attention_rule"]


def _ring(ctx, node, q, k, v, spec: AttentionSpec, doc_local=None, valid_local=None, alibi=None, table=None):
    """Emit the ring op for attention ``node`` of (old) q, k, v → (new node, Shard(2)).

    ``doc_local``, ``valid_local``, ``alibi``, ``table``: the new graph's per-token data, slopes
    and relative-position table, or None."""
    dtype = ctx.example(node).dtype
    qkv = [ctx.env[t] if ctx.example(t).dtype == dtype else
           ctx.emit("to", (ctx.env[t], dtype), op="call_method", placement=Shard(2)) for t in (q, k, v)]
    # the all-to-all layouts take the Ulysses op, which has the ring op's arguments
    op = torch.ops.seqpar.ulysses_attention if layout_of(ctx.schedule).all_to_all else \
        torch.ops.seqpar.ring_attention
    tensors = (doc_local, valid_local, alibi, table)
    while tensors and tensors[-1] is None:          # graphs without per-token data read as before
        tensors = tensors[:-1]
    out = ctx.emit(op.default, (*qkv, spec.encode(), ctx.schedule, ctx.group_name, ctx.overlap, ctx.kernel, *tensors))
    return ctx.emit(operator.getitem, (out, 0), placement=Shard(2)), Shard(2)


def _all_sharded(ctx, q, k, v) -> bool:
    return all(ctx.shard_of(t) == Shard(2) and ctx.example(t).dim() == 4 for t in (q, k, v))


def _dropout_is_zero(ctx, p) -> bool:
    """Whether an attention dropout probability is provably 0.

    Under ``dynamic=True`` Dynamo passes a float argument as a traced scalar (a node whose
    example value is a SymFloat, e.g. from ``.item()``); it counts as 0 only when the shape
    environment proves it (a specialised 0.0, or ``p * 0``), never on its current hint.
    """
    if isinstance(p, fx.Node):
        p = ctx.example(p)
    if p is None:
        return True
    if isinstance(p, (bool, int, float)):
        return p == 0
    try:
        return bool(statically_known_true(p == 0))
    except Exception:  # noqa: BLE001 - a value we cannot reason about is not provably 0
        return False


def _check_dropout(ctx, node, p) -> None:
    if not _dropout_is_zero(ctx, p):
        shown = ctx.example(p) if isinstance(p, fx.Node) else p
        raise ValueError(f"seqpar: attention dropout p={shown} is not supported yet (no per-block RNG); "
                         f"use dropout_p=0 in attention ({_source_line(node)})")


def sdpa_rule(ctx, node):
    """F.scaled_dot_product_attention without a mask (masked ones were canonicalised if provable)."""
    a = call_arguments(node, ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"],
                       {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False})
    _check_dropout(ctx, node, a["dropout_p"])
    if not _all_sharded(ctx, a["query"], a["key"], a["value"]):
        return "attention whose q/k/v are not all [B, H, S, D] sharded along the sequence"
    if a["attn_mask"] is not None:
        return node.meta.get(UNPROVED) or "an explicit attention mask that is not provably a band, documents or padding"
    scale = a["scale"] if a["scale"] is not None else ctx.example(a["query"]).shape[-1] ** -0.5
    spec = AttentionSpec.of(causal=bool(a["is_causal"]), scale=float(scale))
    return _ring(ctx, node, a["query"], a["key"], a["value"], spec)


def _slopes(ctx, slopes, q, what: str = "ALiBi slopes", shape=None):
    """The new graph's ALiBi slopes (or relative-position table) as fp32 [Hq] (``shape``), or a
    reason string why they cannot go to the ring."""
    ex = ctx.example(slopes)
    shape = (ctx.example(q).shape[1],) if shape is None else shape
    if not isinstance(ex, torch.Tensor) or tuple(ex.shape) != tuple(shape):
        return f"{what} that are not a tensor of shape {list(shape)}"
    if ex.requires_grad:
        return f"{what} that require grad (the ring computes no gradient for them)"
    if not isinstance(ctx.placement_of(slopes), Replicate):
        return f"{what} that are not replicated ({ctx.placement_of(slopes)})"
    new = ctx.env[slopes]
    if ex.dtype != torch.float32:
        new = ctx.emit("to", (new, torch.float32), op="call_method", placement=ctx.placement_of(slopes))
    return new


def _table(ctx, table, q):
    """The new graph's relative-position table [Hq, 2S − 1] (fp32), or a reason string. A learned
    table (it requires grad: T5's bias) is replicated and each rank's ring (or Ulysses' inner
    ring, over its heads) computes the gradient of the pairs it attends, so its gradient is summed
    over the group (``ctx.weight``)."""
    ex = ctx.example(table)
    Hq, S = ctx.example(q).shape[1], ctx.example(q).shape[2]
    if not ex.requires_grad:
        return _slopes(ctx, table, q, "a relative-position table", (Hq, 2 * S - 1))
    if tuple(ex.shape) != (Hq, 2 * S - 1) or not isinstance(ctx.placement_of(table), Replicate):
        return f"a learned relative-position table that is not a replicated [Hq, 2S - 1] tensor ({ctx.placement_of(table)})"
    new = ctx.weight(table)
    if ex.dtype != torch.float32:
        new = ctx.emit("to", (new, torch.float32), op="call_method", placement=Replicate())
    return new


def _per_token(ctx, node, what: str, x, q):
    """The new graph's local part of per-token data ``x`` [B, S] (document ids, key validity), or
    a reason string why it cannot go to the ring."""
    if ctx.example(x).shape[0] != ctx.example(q).shape[0]:
        return f"{what} with another batch size than the queries"
    if ctx.shard_of(x) not in (None, Shard(1)):
        return f"{what} sharded unlike the queries"
    return ctx.local(x, 1)


def canonical_attention_rule(ctx, node):
    """canonical_attention(q, k, v, spec, doc_ids, key_padding, alibi_slopes, rel_bias) from a proved
    mask (passes/attention_patterns.py)."""
    q, k, v, spec, *rest = node.args
    doc, valid, alibi, table = (list(rest) + [None] * 4)[:4]
    spec = AttentionSpec.decode(spec)
    if not _all_sharded(ctx, q, k, v):
        return "attention whose q/k/v are not all [B, H, S, D] sharded along the sequence"
    local = []
    for what, x in (("document ids", doc), ("key padding", valid)):
        part = None if x is None else _per_token(ctx, node, what, x, q)
        if isinstance(part, str):
            return part
        local.append(part)
    alibi_new = None
    if alibi is not None:
        alibi_new = _slopes(ctx, alibi, q)
        if isinstance(alibi_new, str):
            return alibi_new
    table_new = None
    if table is not None:
        table_new = _table(ctx, table, q)
        if isinstance(table_new, str):
            return table_new
    return _ring(ctx, node, q, k, v, spec, *local, alibi_new, table_new)
