"""Hand-written attention → one canonical attention node, with its mask proved to be a mask kind.

Reads Dynamo's ``node.meta["example_value"]``; rewrites the graph in place: the chain

    scores = (q @ kᵀ) [* s | / s] [+ additive mask | masked_fill(mask, -inf) | where(mask, ·, -inf)]
    probs  = softmax(scores, -1) [.to(dtype)] [dropout(p=0)]
    out    = probs @ v

becomes ``canonical_attention(q, k, v, causal, window, scale)`` (GQA's repeat_kv of k and v,
``x[:, :, None].expand(...).reshape(...)``, is folded away: the ring sends the small K/V).

Masks are proved, not guessed: a mask whose inputs are all static (positions from ``arange``,
buffers; no user data) is evaluated once here, at the global sequence length, and compared
with the exact causal and sliding-window patterns (and "no mask"). A mask that depends on the
batch (an attention_mask or position_ids input) or matches no kind is left alone, so the graph
falls back to the gather path — never treated as causal unless it is.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["canonical_attention", "canonicalize_handwritten_attention"]


def canonical_attention(q, k, v, causal: bool, window: int | None, scale: float):
    """Single-device meaning of the canonical node: softmax(q kᵀ · scale + mask) v, with
    k/v broadcast over query-head groups. Shapes: q [B,Hq,S,D], k/v [B,Hkv,S,D]."""
    S = q.shape[-2]
    mask = None
    if causal or window is not None:
        i = torch.arange(S, device=q.device)
        diff = i[:, None] - i[None, :]
        mask = diff >= 0
        if window is not None:
            mask &= diff < window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


_MATMUL = {torch.matmul, operator.matmul}
_SOFTMAX = {F.softmax, torch.softmax}
_CASTS = {"to", "type", "float", "type_as", "half", "bfloat16", "contiguous"}


def _is(node, fns=(), methods=()) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in fns) or (node.op == "call_method" and node.target in methods))


def _ex(node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _strip_probs(node):
    """Walk back from the second matmul's left operand through casts and p=0 dropout."""
    while True:
        if _is(node, methods=_CASTS):
            node = node.args[0]
        elif _is(node, fns={F.dropout}):
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            if p and training:
                raise ValueError(f"seqpar: attention dropout p={p} is not supported yet (no per-block RNG); "
                                 f"use p=0 in attention")
            node = node.args[0]
        else:
            return node


def _unrepeat(node):
    """repeat_kv: x[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv*n, S, D) → x."""
    if not _is(node, methods={"reshape", "view"}):
        return node
    exp = node.args[0]
    if not _is(exp, methods={"expand"}):
        return node
    idx = exp.args[0]
    if not (_is(idx, fns={operator.getitem}) and isinstance(idx.args[1], tuple) and len(idx.args[1]) == 5
            and idx.args[1][2] is None):
        return node
    base = idx.args[0]
    b = _ex(base)
    if b is None or b.dim() != 4 or _ex(node).shape[1] % b.shape[1]:
        return node
    return base


def _user_dependent(node: fx.Node, static_inputs: set) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and n not in static_inputs:
            return True
        stack.extend(n.all_input_nodes)
    return False


def _evaluate(gm: fx.GraphModule, node: fx.Node, values: dict):
    """The value of ``node`` computed from its ancestors only (placeholders from ``values``)."""
    g = fx.Graph()
    env: dict = {}
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    for n in gm.graph.nodes:                   # topological order
        if n in seen:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[node])
    sub = fx.GraphModule(gm, g)
    placeholders = [n for n in gm.graph.nodes if n in seen and n.op == "placeholder"]
    with torch.no_grad():
        return sub(*[values[p] for p in placeholders])


def _mask_kind(visible: torch.Tensor, S: int):
    """(causal, window) if ``visible`` [.., S, S] is exactly no mask / causal / a sliding window."""
    flat = visible.reshape(-1, S, S)
    if not bool((flat == flat[:1]).all()):
        return None
    vis = flat[0].cpu()
    if bool(vis.all()):
        return False, None
    tril = torch.ones(S, S, dtype=torch.bool).tril()
    if torch.equal(vis, tril):
        return True, None
    W = int(vis[-1].sum())
    if W >= 1 and torch.equal(vis, tril & ~torch.ones(S, S, dtype=torch.bool).tril(-W)):
        return True, W
    return None


def _visible_from(scores_node, values, gm, static_inputs, S):
    """Peel the mask off the scores: (logits node, (causal, window)) or None."""
    n = scores_node
    if _is(n, fns={operator.add, torch.add}, methods={"add"}):
        a, b = n.args[:2]
        logits, mask = (a, b) if _is(a, fns={operator.mul, operator.truediv, torch.matmul, operator.matmul}) else (b, a)
        if not isinstance(mask, fx.Node) or _user_dependent(mask, static_inputs):
            return None
        m = _evaluate(gm, mask, values)
        finite_ok = bool(((m == 0) | (m <= torch.finfo(m.dtype).min / 2)).all()) if m.is_floating_point() else False
        if not finite_ok:
            return None
        kind = _mask_kind(torch.broadcast_to(m == 0, _ex(n).shape), S)
        return (logits, kind) if kind else None
    if _is(n, fns={torch.masked_fill}, methods={"masked_fill"}):
        logits, mask, value = n.args[:3]
        if not (isinstance(value, float) and value == float("-inf")) or _user_dependent(mask, static_inputs):
            return None
        kind = _mask_kind(torch.broadcast_to(~_evaluate(gm, mask, values).bool(), _ex(n).shape), S)
        return (logits, kind) if kind else None
    if _is(n, fns={torch.where}):
        mask, logits, value = n.args[:3]
        if not (isinstance(value, float) and value == float("-inf")) or _user_dependent(mask, static_inputs):
            return None
        kind = _mask_kind(torch.broadcast_to(_evaluate(gm, mask, values).bool(), _ex(n).shape), S)
        return (logits, kind) if kind else None
    return n, (False, None)


def _match(node, gm, values, static_inputs):
    """(q, k, v, causal, window, scale, nodes to drop) for ``out = probs @ v``, or None."""
    if not _is(node, fns=_MATMUL, methods={"matmul"}):
        return None
    probs, v = node.args[:2]
    sm = _strip_probs(probs)
    if not _is(sm, fns=_SOFTMAX, methods={"softmax"}):
        return None
    dim = sm.kwargs.get("dim", sm.args[1] if len(sm.args) > 1 else None)
    scores = sm.args[0]
    ex = _ex(scores)
    if ex is None or ex.dim() != 4 or dim not in (-1, 3):
        return None
    S = ex.shape[-1]
    if ex.shape[-2] != S:
        return None
    peeled = _visible_from(scores, values, gm, static_inputs, S)
    if peeled is None:
        return None
    logits, (causal, window) = peeled
    scale = 1.0
    if _is(logits, fns={operator.mul, torch.mul}) and isinstance(logits.args[1], (int, float)):
        scale, logits = float(logits.args[1]), logits.args[0]
    elif _is(logits, fns={operator.truediv, torch.div}) and isinstance(logits.args[1], (int, float)):
        scale, logits = 1.0 / float(logits.args[1]), logits.args[0]
    if not _is(logits, fns=_MATMUL, methods={"matmul"}):
        return None
    q, kt = logits.args[:2]
    if not _is(kt, fns={torch.transpose}, methods={"transpose"}) or \
            sorted(d % 4 for d in kt.args[1:3]) != [2, 3]:
        return None
    return q, _unrepeat(kt.args[0]), _unrepeat(v), causal, window, scale


def canonicalize_handwritten_attention(gm: fx.GraphModule, example_inputs, static_inputs: set) -> int:
    """Rewrite every provable hand-written attention in ``gm``; return how many."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs))
    count = 0
    for node in list(gm.graph.nodes):
        try:
            found = _match(node, gm, values, static_inputs)
        except ValueError:
            raise
        except Exception:  # noqa: BLE001 - an unprovable pattern stays as it is (and falls back)
            found = None
        if found is None:
            continue
        q, k, v, causal, window, scale = found
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(canonical_attention, (q, k, v, causal, window, scale))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        _erase_dead(gm.graph, node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _erase_dead(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and every ancestor that only it used (the scores, softmax and mask chain)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.users or n.op not in ("call_function", "call_method"):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(inputs)
