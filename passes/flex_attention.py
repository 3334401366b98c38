"""``flex_attention`` whose ``mask_mod`` is provably causal / a window → the canonical node.

Reads Dynamo's ``node.meta["example_value"]`` and the ``mask_mod`` / ``score_mod`` subgraphs of
``torch.ops.higher_order.flex_attention``; rewrites the graph in place.

The ring carries masks as data, so a ``mask_mod`` is accepted only by evaluation, like every
mask (``mask_proof``): it is called once on the global indices (b, h, q_idx, kv_idx broadcast to
[B, H, S, S]) with its captured buffers, which must be static, and the result must be exactly no
mask, causal or a sliding window. ``score_mod`` must be the identity (no captured buffers);
only the output is read (not the LSE). Anything else — a document ``mask_mod`` over user
tensors, a score_mod — stays as it is (and falls back).

A block mask built inside the compiled region (``create_block_mask`` in ``forward``) leaves a
vmapped computation of the block tables; once the attention no longer reads them it is dead
and removed, including its in-place ``setitem``s and the vmap level bookkeeping (left in, its
``arange(S)`` would be sliced like positions and the tables would not match).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .attention_forms import emit
from .mask_proof import evaluate, example, mask_kind, user_dependent

__all__ = ["canonicalize_flex_attention"]

_FLEX = getattr(torch.ops.higher_order, "flex_attention", None)
_VMAP_BOOKKEEPING = ("_vmap_increment_nesting", "_vmap_decrement_nesting", "lazy_load_decompositions")


def _is_identity_score_mod(sub: fx.GraphModule) -> bool:
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    out = next(n for n in sub.graph.nodes if n.op == "output")
    result = out.args[0]
    result = result[0] if isinstance(result, (tuple, list)) and len(result) == 1 else result
    return bool(placeholders) and result is placeholders[0]


def _visible(gm, mask_mod: fx.GraphModule, buffers, values, static_inputs, shape) -> torch.Tensor | None:
    """The mask_mod evaluated on global indices [B, H, S, S], or None if it reads user data."""
    if any(isinstance(b, fx.Node) and user_dependent(b, static_inputs) for b in buffers):
        return None
    extra = [evaluate(gm, b, values) if isinstance(b, fx.Node) else b for b in buffers]
    B, H, S, _ = shape
    r = torch.arange
    idx = (r(B).view(B, 1, 1, 1), r(H).view(1, H, 1, 1), r(S).view(1, 1, S, 1), r(S).view(1, 1, 1, S))
    with torch.no_grad():
        out = mask_mod(*idx, *extra)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return torch.broadcast_to(out, shape) if out.dtype == torch.bool else None


def _match(gm, node, values, static_inputs):
    q, k, v, score_mod, block_mask, scale, *rest = node.args
    score_buffers = rest[1] if len(rest) > 1 else ()
    mask_buffers = rest[2] if len(rest) > 2 else ()
    eq, ek = example(q), example(k)
    if eq is None or eq.dim() != 4 or ek.shape[-2] != eq.shape[-2]:
        return None
    if any(not (u.target is operator.getitem and (u.args[1] == 0 or not u.users)) for u in node.users):
        return None
    if score_buffers or not _is_identity_score_mod(getattr(gm, score_mod.target)):
        return None
    mask_mod = block_mask[-1]
    if not (isinstance(mask_mod, fx.Node) and mask_mod.op == "get_attr"):
        return None
    S = eq.shape[-2]
    if tuple(block_mask[:2]) != (S, S):
        return None
    visible = _visible(gm, getattr(gm, mask_mod.target), mask_buffers, values, static_inputs,
                       (eq.shape[0], eq.shape[1], S, S))
    kind = None if visible is None else mask_kind(visible, S)
    if kind is None:
        return None
    return q, k, v, kind[0], kind[1], None, float(scale if scale is not None else eq.shape[-1] ** -0.5)


def _remove_dead_block_mask(gm: fx.GraphModule) -> None:
    """Remove what nothing live reads any more (the block-mask computation the replaced attention
    read): liveness from the output and impure nodes, where an in-place ``setitem`` is live only
    if the tensor it writes is, and vmap's level bookkeeping only while a batch-dim node is."""
    def name(n):
        return getattr(n.target, "__name__", "")
    nodes = list(gm.graph.nodes)
    live, stack = set(), [n for n in nodes if n.op in ("output", "placeholder", "get_attr")
                          or (n.target is not operator.setitem and name(n) not in _VMAP_BOOKKEEPING
                              and n.is_impure())]
    while True:
        while stack:
            n = stack.pop()
            if n not in live:
                live.add(n)
                stack.extend(n.all_input_nodes)
        stack = [n for n in nodes if n not in live and n.target is operator.setitem and n.args[0] in live]
        if any("batch_dim" in name(n) for n in live):
            stack += [n for n in nodes if n not in live and name(n) in _VMAP_BOOKKEEPING]
        if not stack:
            break
    for n in reversed(nodes):
        if n not in live:
            gm.graph.erase_node(n)


def canonicalize_flex_attention(gm: fx.GraphModule, values: dict, static_inputs: set) -> int:
    """Rewrite every provable ``flex_attention`` call in ``gm``; return how many."""
    from .attention_patterns import canonical_attention
    if _FLEX is None:
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _FLEX:
            continue
        try:
            found = _match(gm, node, values, static_inputs)
        except Exception:  # noqa: BLE001 - an unprovable mask_mod stays as it is (and falls back)
            found = None
        if found is None:
            continue
        with gm.graph.inserting_before(node):
            new = emit(gm.graph, canonical_attention, found)
        new.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(new)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        count += 1
    if count:
        _remove_dead_block_mask(gm)
    return count
