"""Hand-written attention → one canonical attention node, with its mask proved to be a mask kind.

Reads Dynamo's ``node.meta["example_value"]``; rewrites the graph in place: the chain

    scores = (q @ kᵀ) [* s | / s] [+ additive mask | masked_fill(mask, -inf) | where(mask, ·, -inf)]
    probs  = softmax(scores, -1) [.to(dtype)] [dropout(p=0)]
    out    = probs @ v

becomes ``canonical_attention(q, k, v, causal, window, doc_ids, scale)`` (GQA's repeat_kv of k and v,
``x[:, :, None].expand(...).reshape(...)``, is folded away: the ring sends the small K/V).

``F.scaled_dot_product_attention`` with an explicit ``attn_mask`` (what transformers passes
for sliding windows) goes the same way.

Masks are proved, not guessed: a mask whose inputs are all static (positions from ``arange``,
buffers; no user data) is evaluated once here, at the global sequence length, and compared
with the exact causal and sliding-window patterns (and "no mask"). Two kinds of user data are
understood: a same-document factor ``doc[b, q] == doc[b, kv]`` (becomes ``doc_ids``), and —
when ``doc`` is numbered from position ids that restart, as transformers packs sequences —
shift-invariant comparisons of those position ids (``pos[b, kv] <= pos[b, q]``), which equal
index comparisons inside a document. A mask that depends on the batch in any other way (a
padding attention_mask, a comparison with a constant) or matches no kind is left alone, so the
graph falls back to the gather path — never treated as causal unless it is.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["canonical_attention", "canonicalize_handwritten_attention"]


def canonical_attention(q, k, v, causal: bool, window: int | None, doc_ids, scale: float):
    """Single-device meaning of the canonical node: softmax(q kᵀ · scale + mask) v, with
    k/v broadcast over query-head groups. Shapes: q [B,Hq,S,D], k/v [B,Hkv,S,D], doc_ids [B,S]
    or None (keys visible only within the query's document)."""
    S = q.shape[-2]
    mask = None
    if causal or window is not None:
        i = torch.arange(S, device=q.device)
        diff = i[:, None] - i[None, :]
        mask = diff >= 0
        if window is not None:
            mask &= diff < window
    if doc_ids is not None:
        same = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
        mask = same if mask is None else mask & same
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


def _ancestors(node: fx.Node, stop=frozenset()):
    """``node`` and every node it is computed from, not walking past the nodes in ``stop``."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or n in stop:
            continue
        seen.add(n)
        yield n
        stack.extend(n.all_input_nodes)


def _user_dependent(node: fx.Node, static_inputs: set, stop: frozenset = frozenset()) -> bool:
    return any(n.op == "placeholder" and n not in static_inputs for n in _ancestors(node, stop))


def _gather_side(gather: fx.Node, B: int, S: int, gm, values, static_inputs) -> str | None:
    """"q" or "kv" if ``gather`` is ``X[b, i]`` with b = arange(B) over the batch dim and i an
    arange(S) over the query (dim 2) or key (dim 3) dim of a [B, H, S, S] mask, else None."""
    idx = gather.args[1]
    if not (isinstance(idx, tuple) and len(idx) == 2 and all(isinstance(i, fx.Node) for i in idx)):
        return None
    if any(_user_dependent(i, static_inputs) for i in idx):
        return None
    try:
        bi, si = (_evaluate(gm, i, values) for i in idx)
    except Exception:  # noqa: BLE001 - an index we cannot evaluate proves nothing
        return None
    r = torch.arange
    if not torch.equal(bi, r(B).view(B, 1, 1, 1)):
        return None
    if torch.equal(si, r(S).view(1, 1, S, 1)):
        return "q"
    return "kv" if torch.equal(si, r(S).view(1, 1, 1, S)) else None


def _evaluate(gm: fx.GraphModule, node: fx.Node, values: dict, substitute: dict | None = None):
    """The value of ``node`` computed from its ancestors only (placeholders from ``values``,
    nodes in ``substitute`` replaced by the given values)."""
    substitute = substitute or {}
    needed = set(_ancestors(node, frozenset(substitute))) | set(substitute)
    env: dict = {}
    with torch.no_grad():
        for n in gm.graph.nodes:                   # topological order
            if n not in needed:
                continue
            if n in substitute:
                env[n] = substitute[n]
            elif n.op == "placeholder":
                env[n] = values[n]
            elif n.op == "get_attr":
                env[n] = getattr(gm, n.target)
            else:
                args = fx.node.map_arg(n.args, env.__getitem__)
                kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
                if n.op == "call_method":
                    env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                else:
                    env[n] = n.target(*args, **kwargs)
    return env[node]


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
    """Peel the mask off the scores: (logits node, (causal, window, doc_ids)) or None."""
    n = scores_node
    shape = _ex(n).shape
    if _is(n, fns={operator.add, torch.add}, methods={"add"}):
        a, b = n.args[:2]
        logits, mask = (a, b) if _is(a, fns={operator.mul, operator.truediv, torch.matmul, operator.matmul}) else (b, a)
        if _ex(mask) is None or not _ex(mask).is_floating_point():
            return None
        kind = _static_mask_kind(mask, gm, values, static_inputs, shape, S)
    elif _is(n, fns={torch.masked_fill}, methods={"masked_fill"}):
        logits, mask, value = n.args[:3]
        if not (isinstance(value, float) and value == float("-inf")) or not isinstance(mask, fx.Node):
            return None
        if _is(mask, fns={operator.invert, torch.logical_not}, methods={"logical_not", "__invert__"}):
            kind = _static_mask_kind(mask.args[0], gm, values, static_inputs, shape, S)   # ~visible
            return (logits, kind) if kind else None
        kind = _static_mask_kind(mask, gm, values, static_inputs, shape, S, negated=True)
    elif _is(n, fns={torch.where}):
        mask, logits, value = n.args[:3]
        if not (isinstance(value, float) and value == float("-inf")):
            return None
        kind = _static_mask_kind(mask, gm, values, static_inputs, shape, S)
    else:
        return n, (False, None, None)
    return (logits, kind) if kind else None


_CONJUNCTION_PATH = {"to", "expand", "and_", "logical_and", "__and__", "bool"}


def _doc_term(mask: fx.Node, gm, values, static_inputs):
    """A same-document factor of ``mask``: ``X[b, q] == X[b, kv]`` over index aranges, reaching
    the mask through conjunctions only (and, casts, expands). Returns (eq node, X) or None.

    transformers builds packed-sequence masks this way from position ids that restart."""
    for n in _ancestors(mask):
        if not (_is(n, fns={operator.eq, torch.eq}, methods={"eq", "__eq__"}) and len(n.args) == 2):
            continue
        a, b = n.args
        if not (_is(a, fns={operator.getitem}) and _is(b, fns={operator.getitem}) and a.args[0] is b.args[0]):
            continue
        X = a.args[0]
        ex = _ex(X)
        if ex is None or ex.dim() != 2 or not _user_dependent(X, static_inputs):
            continue
        B, S = ex.shape
        if {_gather_side(g, B, S, gm, values, static_inputs) for g in (a, b)} != {"q", "kv"}:
            continue
        u = n                                          # eq must reach the mask by conjunctions only
        while u is not mask:
            if len(u.users) != 1:
                break
            u = next(iter(u.users))
            name = u.target if isinstance(u.target, str) else getattr(u.target, "__name__", "")
            if u is not mask and name not in _CONJUNCTION_PATH:
                break
        else:
            return n, X
    return None


_COMPARISONS = {operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne,
                torch.lt, torch.le, torch.gt, torch.ge, torch.eq, torch.ne}
_COMPARISON_METHODS = {"lt", "le", "gt", "ge", "eq", "ne", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__"}
_SHIFTS = {operator.add, operator.sub, torch.add, torch.sub}
_SHAPE_ONLY = {"new_ones", "new_zeros", "new_empty"}     # transformers' and_masks starts from new_ones


def _strip_views(node):
    """``x.expand(B, -1)`` / ``x.contiguous()`` of a [B, S] tensor to the same shape is ``x``."""
    while (_is(node, methods={"expand", "contiguous"}) and _ex(node) is not None
           and _ex(node.args[0]) is not None and _ex(node).shape == _ex(node.args[0]).shape):
        node = node.args[0]
    return node


def _packed_positions(doc: fx.Node):
    """``pos`` if ``doc`` is ``(diff(pos, dim=-1) != 1).cumsum(-1)`` (how transformers numbers
    packed documents from position ids that restart), else None.

    Why this matters: inside one such document every step of ``pos`` is exactly +1, so
    ``pos[i] - pos[j] == i - j`` for any two tokens of the same document (whatever ``prepend``
    is). A comparison of shifted positions is then the same comparison of token indices."""
    if not (_is(doc, fns={torch.cumsum}, methods={"cumsum"}) and len(doc.args) >= 1):
        return None
    dim = doc.kwargs.get("dim", doc.args[1] if len(doc.args) > 1 else None)
    ne = doc.args[0]
    if dim not in (-1, 1) or not (_is(ne, fns={operator.ne, torch.ne}, methods={"ne", "__ne__"})
                                  and len(ne.args) == 2 and ne.args[1] == 1):
        return None
    diff = ne.args[0]
    if not (_is(diff, fns={torch.diff}, methods={"diff"})
            and diff.kwargs.get("dim", diff.args[2] if len(diff.args) > 2 else -1) in (-1, 1)
            and diff.kwargs.get("n", diff.args[1] if len(diff.args) > 1 else 1) == 1
            and diff.kwargs.get("append") is None and isinstance(diff.args[0], fx.Node)):
        return None
    pos = _strip_views(diff.args[0])
    ex = _ex(pos)
    return pos if ex is not None and ex.dim() == 2 and not ex.is_floating_point() else None


def _shift_base(node):
    """(base, offset) for ``base [+|- int]...`` (``node`` itself, offset 0, for anything else)."""
    offset = 0
    while _is(node, fns=_SHIFTS, methods={"add", "sub", "__add__", "__sub__"}) and \
            isinstance(node.args[1], int) and not isinstance(node.args[1], bool):
        offset += node.args[1] if node.target in (operator.add, torch.add, "add", "__add__") else -node.args[1]
        node = node.args[0]
    return node, offset


def _packed_position_terms(mask, eq, doc, gm, values, static_inputs):
    """Substitutes proving a mask that compares position ids of packed documents.

    transformers builds causality (and windows) of packed sequences as ``pos[b, kv] <= pos[b, q]``
    (``pos[b, kv] > pos[b, q] - W``) next to the document factor ``doc[b, q] == doc[b, kv]``,
    with ``doc`` numbered from ``pos`` itself. Within a document the two gathers differ from the
    token indices by one common constant, so every comparison between (shifted) ``pos[b, q]``
    and ``pos[b, kv]`` equals the comparison of the indices: substituting the index aranges for
    the gathers gives the exact mask wherever the document factor holds, and the factor itself
    is a conjunct. Anything else that reads ``pos`` (a comparison with a constant, arithmetic
    other than integer shifts) is not shift-invariant, and the mask stays unproved.
    Returns {gather node: index values} or None.
    """
    pos = _packed_positions(doc)
    if pos is None:
        return None
    B, S = _ex(pos).shape
    gathers = {}
    for n in _ancestors(mask, frozenset([eq])):
        if _is(n, fns={operator.getitem}) and _strip_views(n.args[0]) is pos:
            gathers[n] = _gather_side(n, B, S, gm, values, static_inputs)
            if gathers[n] is None:
                return None
    if set(gathers.values()) != {"q", "kv"}:
        return None
    for g in gathers:                              # every use: a comparison of two gathers
        frontier = list(g.users)
        while frontier:
            u = frontier.pop()
            if u not in gathers and _shift_base(u)[0] in gathers:       # gather ± int: look further
                frontier.extend(u.users)
            elif _is(u, methods=_SHAPE_ONLY):      # reads the gather's shape and dtype, not its values
                continue
            elif not (_is(u, fns=_COMPARISONS, methods=_COMPARISON_METHODS) and len(u.args) == 2
                      and all(isinstance(a, fx.Node) and _shift_base(a)[0] in gathers for a in u.args)):
                return None
    index = {"q": torch.arange(S).view(1, 1, S, 1), "kv": torch.arange(S).view(1, 1, 1, S)}
    return {g: index[side].expand(_ex(g).shape).to(_ex(g).dtype) for g, side in gathers.items()}


def _static_mask_kind(mask, gm, values, static_inputs, shape, S, negated: bool = False):
    """(causal, window, doc_ids node or None) of a mask tensor (bool: True = visible, or True =
    hidden with ``negated``; float: 0 / very negative) whose value depends on no user input except
    through a same-document factor (only where visibility is a conjunction, so not negated) and,
    when the documents are derived from position ids, through shift-invariant comparisons of
    those position ids (see ``_packed_position_terms``)."""
    if not isinstance(mask, fx.Node):
        return None
    doc = None
    substitute = {}
    if _user_dependent(mask, static_inputs):
        if negated:
            return None
        found = _doc_term(mask, gm, values, static_inputs)
        if found is None:
            return None
        eq, doc = found
        substitute[eq] = torch.ones(_ex(eq).shape, dtype=torch.bool, device=_ex(eq).device)
        if _user_dependent(mask, static_inputs, frozenset(substitute)):
            positions = _packed_position_terms(mask, eq, doc, gm, values, static_inputs)
            if positions is None:
                return None
            substitute.update(positions)
            if _user_dependent(mask, static_inputs, frozenset(substitute)):
                return None
    m = _evaluate(gm, mask, values, substitute)
    if m.dtype == torch.bool:
        visible = ~m if negated else m
    elif m.is_floating_point() and bool(((m == 0) | (m <= torch.finfo(m.dtype).min / 2)).all()):
        visible = m == 0
    else:
        return None
    kind = _mask_kind(torch.broadcast_to(visible, shape), S)
    return None if kind is None else (*kind, doc)


_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def _match_sdpa(node, gm, values, static_inputs):
    """SDPA with an explicit ``attn_mask`` that is provably causal / a window / nothing, or
    with K/V repeated for GQA (folded, so the ring sends Hkv heads)."""
    if not _is(node, fns=_SDPA):
        return None
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    if a.get("dropout_p"):
        return None
    q = _ex(a["query"])
    if q is None or q.dim() != 4 or _ex(a["key"]).shape[-2] != q.shape[-2]:
        return None
    S = q.shape[-2]
    k, v = _unrepeat(a["key"]), _unrepeat(a["value"])
    if a.get("attn_mask") is None:
        if k is a["key"] and v is a["value"]:
            return None                                    # plain SDPA: handled as it is
        kind = (bool(a.get("is_causal")), None, None)
    elif a.get("is_causal"):
        return None
    else:
        kind = _static_mask_kind(a["attn_mask"], gm, values, static_inputs, (*q.shape[:-1], S), S)
        if kind is None:
            return None
    scale = a.get("scale") if a.get("scale") is not None else q.shape[-1] ** -0.5
    return a["query"], k, v, *kind, scale


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
    logits, (causal, window, doc) = peeled
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
    return q, _unrepeat(kt.args[0]), _unrepeat(v), causal, window, doc, scale


def canonicalize_handwritten_attention(gm: fx.GraphModule, example_inputs, static_inputs: set) -> int:
    """Rewrite every provable hand-written attention in ``gm``; return how many."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs))
    count = 0
    for node in list(gm.graph.nodes):
        try:
            found = _match(node, gm, values, static_inputs) or _match_sdpa(node, gm, values, static_inputs)
        except ValueError:
            raise
        except Exception:  # noqa: BLE001 - an unprovable pattern stays as it is (and falls back)
            found = None
        if found is None:
            continue
        q, k, v, causal, window, doc, scale = found
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(canonical_attention, (q, k, v, causal, window, doc, scale))
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
