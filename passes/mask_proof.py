"""Masks proved by evaluation: which of the ring's mask kinds a traced mask is.

Reads Dynamo's ``node.meta["example_value"]``; writes nothing (pure analysis, used by
``attention_patterns`` and the other attention-form recognisers).

A mask whose inputs are all static (positions from ``arange``, buffers; no user data) is
evaluated once, at the global sequence length, and compared with the exact causal and
sliding-window patterns (and "no mask"). Two kinds of user data are understood: a
same-document factor ``doc[b, q] == doc[b, kv]`` (becomes ``doc_ids``), and — when ``doc`` is
numbered from position ids that restart, as transformers packs sequences — shift-invariant
comparisons of those position ids (``pos[b, kv] <= pos[b, q]``), which equal index comparisons
inside a document. A mask that depends on the batch in any other way (a padding
attention_mask, a comparison with a constant) or matches no kind proves nothing, so the graph
falls back to the gather path — never treated as causal unless it is.
"""
from __future__ import annotations

import operator
from functools import lru_cache

import torch
import torch.fx as fx

__all__ = ["is_call", "example", "ancestors", "user_dependent", "evaluate", "mask_kind",
           "evaluate_mask_term", "is_hidden_value", "static_mask_kind"]


def is_call(node, fns=(), methods=()) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in fns) or (node.op == "call_method" and node.target in methods))


def example(node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def ancestors(node: fx.Node, stop=frozenset()):
    """``node`` and every node it is computed from, not walking past the nodes in ``stop``."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or n in stop:
            continue
        seen.add(n)
        yield n
        stack.extend(n.all_input_nodes)


def user_dependent(node: fx.Node, static_inputs: set, stop: frozenset = frozenset()) -> bool:
    return any(n.op == "placeholder" and n not in static_inputs for n in ancestors(node, stop))


def _gather_side(gather: fx.Node, B: int, S: int, gm, values, static_inputs) -> str | None:
    """"q" or "kv" if ``gather`` is ``X[b, i]`` with b = arange(B) over the batch dim and i an
    arange(S) over the query (dim 2) or key (dim 3) dim of a [B, H, S, S] mask, else None."""
    idx = gather.args[1]
    if not (isinstance(idx, tuple) and len(idx) == 2 and all(isinstance(i, fx.Node) for i in idx)):
        return None
    if any(user_dependent(i, static_inputs) for i in idx):
        return None
    try:
        bi, si = (evaluate(gm, i, values) for i in idx)
    except Exception:  # noqa: BLE001 - an index we cannot evaluate proves nothing
        return None
    r = torch.arange
    if not torch.equal(bi, r(B).view(B, 1, 1, 1)):
        return None
    if torch.equal(si, r(S).view(1, 1, S, 1)):
        return "q"
    return "kv" if torch.equal(si, r(S).view(1, 1, 1, S)) else None


def evaluate(gm: fx.GraphModule, node: fx.Node, values: dict, substitute: dict | None = None):
    """The value of ``node`` computed from its ancestors only (placeholders from ``values``,
    nodes in ``substitute`` replaced by the given values)."""
    substitute = substitute or {}
    needed = set(ancestors(node, frozenset(substitute))) | set(substitute)
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


def mask_kind(visible: torch.Tensor, S: int):
    """(causal, window) if ``visible`` [.., S, S] is exactly no mask / causal / a sliding window."""
    flat = visible.reshape(-1, S, S)
    if not bool((flat == flat[:1]).all()):
        return None
    vis = flat[0].cpu()
    if bool(vis.all()):
        return False, None
    if torch.equal(vis, _band(S, None)):
        return True, None
    W = int(vis[-1].sum())
    if W >= 1 and torch.equal(vis, _band(S, W)):
        return True, W
    return None


@lru_cache(maxsize=16)
def _band(S: int, W: int | None) -> torch.Tensor:
    """The causal (W None) or sliding-window [S, S] visibility, built once per (S, W): every
    layer of a model proves against the same one (compile time stays linear in the layers)."""
    tril = torch.ones(S, S, dtype=torch.bool).tril()
    return tril if W is None else tril & ~torch.ones(S, S, dtype=torch.bool).tril(-W)


_CONJUNCTION_PATH = {"to", "expand", "and_", "logical_and", "__and__", "bool"}


def _doc_term(mask: fx.Node, gm, values, static_inputs):
    """A same-document factor of ``mask``: ``X[b, q] == X[b, kv]`` over index aranges, reaching
    the mask through conjunctions only (and, casts, expands). Returns (eq node, X) or None.

    transformers builds packed-sequence masks this way from position ids that restart."""
    for n in ancestors(mask):
        if not (is_call(n, fns={operator.eq, torch.eq}, methods={"eq", "__eq__"}) and len(n.args) == 2):
            continue
        a, b = n.args
        if not (is_call(a, fns={operator.getitem}) and is_call(b, fns={operator.getitem}) and a.args[0] is b.args[0]):
            continue
        X = a.args[0]
        ex = example(X)
        if ex is None or ex.dim() != 2 or not user_dependent(X, static_inputs):
            continue
        B, S = ex.shape
        if {_gather_side(g, B, S, gm, values, static_inputs) for g in (a, b)} != {"q", "kv"}:
            continue
        u = n                                          # eq must reach the mask by conjunctions only
        while u is not mask:
            if len(u.users) != 1:
                break
            prev, u = u, next(iter(u.users))
            name = u.target if isinstance(u.target, str) else getattr(u.target, "__name__", "")
            if u is not mask and name not in _CONJUNCTION_PATH and not _identity_slice(u, prev) \
                    and not _hiding_where(u, prev):
                break
        else:
            return n, X
    return None


def _identity_slice(node, prev) -> bool:
    """``prev[:, :, :, :k]`` that keeps every element (a slice to the full length, as
    transformers cuts its mask to the key length): the same values, so still a conjunction."""
    if not (is_call(node, fns={operator.getitem}) and node.args[0] is prev):
        return False
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    a, b = example(prev), example(node)
    return (all(isinstance(i, slice) or i is Ellipsis for i in idx) and a is not None and b is not None
            and tuple(a.shape) == tuple(b.shape))


def _hiding_where(node, prev) -> bool:
    """``where(prev, visible, fill)`` with a constant ``fill`` that hides a key: a False of the
    conjunction (another document) becomes hidden, as a False of the rest does (transformers'
    float masks). The proved value is then checked to be 0 or hidden everywhere."""
    if not (is_call(node, fns={torch.where}) and len(node.args) == 3 and node.args[0] is prev):
        return False
    fill, ex = node.args[2], example(node)
    return (isinstance(fill, (int, float)) and not isinstance(fill, bool) and ex is not None
            and ex.is_floating_point() and fill <= torch.finfo(ex.dtype).min / 2)


_COMPARISONS = {operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne,
                torch.lt, torch.le, torch.gt, torch.ge, torch.eq, torch.ne}
_COMPARISON_METHODS = {"lt", "le", "gt", "ge", "eq", "ne", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__"}
_SHIFTS = {operator.add, operator.sub, torch.add, torch.sub}
_SHAPE_ONLY = {"new_ones", "new_zeros", "new_empty"}     # transformers' and_masks starts from new_ones


def _strip_views(node):
    """``x.expand(B, -1)`` / ``x.contiguous()`` of a [B, S] tensor to the same shape is ``x``."""
    while (is_call(node, methods={"expand", "contiguous"}) and example(node) is not None
           and example(node.args[0]) is not None and example(node).shape == example(node.args[0]).shape):
        node = node.args[0]
    return node


def _position_base(node):
    """``node`` with views and batch broadcasts stripped: ``pos.expand(B, -1)`` of a [1, S]
    ``pos`` is ``pos`` (every row holds the same ids), so the documents numbered from one expand
    and the gathers from another compare the same position ids."""
    node = _strip_views(node)
    while is_call(node, methods={"expand"}) and example(node) is not None and example(node.args[0]) is not None:
        inner, outer = example(node.args[0]).shape, example(node).shape
        if len(inner) != len(outer) or any(i != o and i != 1 for i, o in zip(inner, outer)) or inner[-1] != outer[-1]:
            break
        node = _strip_views(node.args[0])
    return node


def _packed_positions(doc: fx.Node):
    """``pos`` if ``doc`` is ``(diff(pos, dim=-1) != 1).cumsum(-1)`` (how transformers numbers
    packed documents from position ids that restart), else None.

    Why this matters: inside one such document every step of ``pos`` is exactly +1, so
    ``pos[i] - pos[j] == i - j`` for any two tokens of the same document (whatever ``prepend``
    is). A comparison of shifted positions is then the same comparison of token indices."""
    if not (is_call(doc, fns={torch.cumsum}, methods={"cumsum"}) and len(doc.args) >= 1):
        return None
    dim = doc.kwargs.get("dim", doc.args[1] if len(doc.args) > 1 else None)
    ne = doc.args[0]
    if dim not in (-1, 1) or not (is_call(ne, fns={operator.ne, torch.ne}, methods={"ne", "__ne__"})
                                  and len(ne.args) == 2 and ne.args[1] == 1):
        return None
    diff = ne.args[0]
    if not (is_call(diff, fns={torch.diff}, methods={"diff"})
            and diff.kwargs.get("dim", diff.args[2] if len(diff.args) > 2 else -1) in (-1, 1)
            and diff.kwargs.get("n", diff.args[1] if len(diff.args) > 1 else 1) == 1
            and diff.kwargs.get("append") is None and isinstance(diff.args[0], fx.Node)):
        return None
    pos = _position_base(diff.args[0])
    ex = example(pos)
    return pos if ex is not None and ex.dim() == 2 and not ex.is_floating_point() else None


def _shift_base(node):
    """(base, offset) for ``base [+|- int]...`` (``node`` itself, offset 0, for anything else)."""
    offset = 0
    while is_call(node, fns=_SHIFTS, methods={"add", "sub", "__add__", "__sub__"}) and \
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
    gathers = {}
    for n in ancestors(mask, frozenset([eq])):
        if is_call(n, fns={operator.getitem}) and _position_base(n.args[0]) is pos:
            B, S = example(n.args[0]).shape            # the gathered (maybe batch-broadcast) ids
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
            elif is_call(u, methods=_SHAPE_ONLY):      # reads the gather's shape and dtype, not its values
                continue
            elif not (is_call(u, fns=_COMPARISONS, methods=_COMPARISON_METHODS) and len(u.args) == 2
                      and all(isinstance(a, fx.Node) and _shift_base(a)[0] in gathers for a in u.args)):
                return None
    index = {"q": torch.arange(S).view(1, 1, S, 1), "kv": torch.arange(S).view(1, 1, 1, S)}
    return {g: index[side].expand(example(g).shape).to(example(g).dtype) for g, side in gathers.items()}


def evaluate_mask_term(mask, gm, values, static_inputs, negated: bool = False):
    """(value, doc node or None): the value of a mask or score term whose value depends on no user
    input except through a same-document factor (only where visibility is a conjunction, so not
    ``negated``) and, when the documents are derived from position ids, through shift-invariant
    comparisons of those position ids (see ``_packed_position_terms``); None otherwise. The
    document factor is evaluated as all-true: the caller passes ``doc`` on as ``doc_ids``."""
    if not isinstance(mask, fx.Node):
        return None
    doc = None
    substitute = {}
    if user_dependent(mask, static_inputs):
        if negated:
            return None
        found = _doc_term(mask, gm, values, static_inputs)
        if found is None:
            return None
        eq, doc = found
        substitute[eq] = torch.ones(example(eq).shape, dtype=torch.bool, device=example(eq).device)
        if user_dependent(mask, static_inputs, frozenset(substitute)):
            positions = _packed_position_terms(mask, eq, doc, gm, values, static_inputs)
            if positions is None:
                return None
            substitute.update(positions)
            if user_dependent(mask, static_inputs, frozenset(substitute)):
                return None
    return evaluate(gm, mask, values, substitute), doc


def is_hidden_value(m: torch.Tensor) -> torch.Tensor:
    """Where a float score term hides its key: -inf or at most half the dtype's lowest value
    (``finfo.min`` and ``-finfo.max`` masks: exp() of them is exactly 0 next to any real score)."""
    return m <= torch.finfo(m.dtype).min / 2


def static_mask_kind(mask, gm, values, static_inputs, shape, S, negated: bool = False):
    """(causal, window, doc_ids node or None) of a mask tensor (bool: True = visible, or True =
    hidden with ``negated``; float: 0 / very negative), proved by ``evaluate_mask_term``."""
    found = evaluate_mask_term(mask, gm, values, static_inputs, negated)
    if found is None:
        return None
    m, doc = found
    if m.dtype == torch.bool:
        visible = ~m if negated else m
    elif m.is_floating_point() and bool(((m == 0) | is_hidden_value(m)).all()):
        visible = m == 0
    else:
        return None
    kind = mask_kind(torch.broadcast_to(visible, shape), S)
    return None if kind is None else (*kind, doc)
