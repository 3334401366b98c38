"""Mask factors read from per-token data: which tokens' ids or validity decide visibility.

Reads Dynamo's ``node.meta["example_value"]``; writes nothing. Used by ``mask_proof`` to take
the user-data factors out of a mask before the rest (positions only) is evaluated.

A mask is proved by evaluating it once at the global length, which needs every input it reads
to be known. User data (the batch) is not; but three ways of using it are per-token data the
ring carries exactly, so each such factor is found, evaluated as all-visible, and handed on as
a tensor instead:
  * documents: ``X[b, q] == X[b, kv]`` (gathers over index aranges, transformers' packed
    sequences) or ``X[:, None, :, None] == X[:, None, None, :]`` (broadcast views): ``X`` [B, S]
    becomes the op's ``doc_ids``; when ``X`` is numbered from position ids that restart,
    shift-invariant comparisons of those position ids equal index comparisons (below);
  * key padding: a bool value broadcast over queries (shape [B or 1, 1, 1, S]: a per-key value,
    ``attention_mask[b, kv]`` in transformers' ``masking_utils``, ``mask[:, None, None, :]`` in
    hand-written code) becomes the op's ``key_padding``; in a mask of hidden keys it is a
    hidden-key factor and its negation is the validity.
A factor counts only where it reaches the mask through a conjunction of visibility (and,
casts, broadcasts, a full-length slice, a ``where`` turning it into an additive mask) or, for a
mask of hidden keys, a disjunction: then the mask is exactly the factor combined with the rest.

Shape legend: B batch, H mask heads (1), S sequence length.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .mask_proof import ancestors, evaluate, example, is_call, user_dependent

__all__ = ["CARRIER", "document_factor", "key_source", "padding_factor", "packed_position_terms"]

# ops through which a factor reaches the mask unchanged in meaning: casts, broadcasts, views
_VALUE_PATH = {"to", "expand", "bool", "contiguous", "view", "reshape", "unsqueeze", "expand_as"}
# ``node.meta`` key of the node that takes a factor to the canonical node: the factor's other
# attention (a mask shared by every layer) must not see it as a use that leaves the mask
CARRIER = "seqpar_token_carrier"
_AND = {"and_", "logical_and", "__and__", "bitwise_and", "__rand__"}
_OR = {"or_", "logical_or", "__or__", "bitwise_or", "__ror__"}


def _name(node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


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


def _per_token_side(node, S: int):
    """(source [B or 1, S], "q" or "kv") if ``node`` is a per-token tensor viewed over the
    query (shape [.., S, 1]) or key (shape [.., 1, S]) dim of a [B, H, S, S] mask through views
    only (``X[:, None, :, None]``, ``unsqueeze``, ``view``), else None."""
    ex = example(node)
    if ex is None or ex.dim() not in (3, 4) or (ex.dim() == 4 and ex.shape[1] != 1):
        return None
    side = "q" if tuple(ex.shape[-2:]) == (S, 1) else "kv" if tuple(ex.shape[-2:]) == (1, S) else None
    src = node
    while side is not None:
        e = example(src)
        if e is not None and e.dim() == 2 and e.shape[-1] == S:
            return src, side
        if is_call(src, methods={"view", "reshape", "unsqueeze", "contiguous"}) or (
                is_call(src, fns={torch.unsqueeze, torch.reshape}) or
                (is_call(src, fns={operator.getitem}) and _views_only(src.args[1]))):
            src = src.args[0]
            continue
        return None
    return None


def _views_only(idx) -> bool:
    idx = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or i == slice(None) for i in idx)


def _identity_slice(node, prev) -> bool:
    """``prev[:, :, :, :k]`` that keeps every element (a slice to the full length, as
    transformers cuts its mask to the key length): the same values, so still a conjunction."""
    if not (is_call(node, fns={operator.getitem}) and node.args[0] is prev):
        return False
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    a, b = example(prev), example(node)
    return (all(isinstance(i, slice) or i is Ellipsis for i in idx) and a is not None and b is not None
            and tuple(a.shape) == tuple(b.shape))


def _hiding_where(node, prev):
    """``where(prev, visible, fill)`` with a constant ``fill`` that hides a key: a False of the
    conjunction (another document, a padding key) becomes hidden, as a False of the rest does
    (transformers' float masks). The proved value is then checked to be 0 or hidden
    everywhere. Returns the fill, or None."""
    if not (is_call(node, fns={torch.where}) and len(node.args) == 3 and node.args[0] is prev):
        return None
    fill, ex = node.args[2], example(node)
    ok = (isinstance(fill, (int, float)) and not isinstance(fill, bool) and ex is not None
          and ex.is_floating_point() and fill <= torch.finfo(ex.dtype).min / 2)
    return float(fill) if ok else None


def _reaches(node: fx.Node, mask: fx.Node, negated: bool):
    """Whether ``node`` reaches ``mask`` as one factor of a conjunction of visibility (a
    disjunction of hidden keys with ``negated``): along its only uses, through the ops above.
    Returns (True, the finite fill of a hiding ``where`` on the way or None) or (False, None)."""
    combine = _OR if negated else _AND
    u, fill = node, None
    while u is not mask:
        users = [x for x in u.users if not x.meta.get(CARRIER)]
        if len(users) != 1:
            return False, None
        prev, u = u, users[0]
        name = _name(u)
        ep, eu = example(prev), example(u)
        if ep is not None and eu is not None and ep.is_floating_point() and not eu.is_floating_point():
            return False, None                 # a float mask read as bool: 0 (visible) becomes False
        if name in combine or name in _VALUE_PATH or _identity_slice(u, prev):
            continue
        hide = None if negated else _hiding_where(u, prev)
        if hide is None:
            return False, None
        if hide != float("-inf"):
            fill = hide
    return True, fill


def document_factor(mask: fx.Node, gm, values, static_inputs):
    """A same-document factor of ``mask`` (module doc). Returns (eq node, X, finite fill or
    None) or None."""
    for n in ancestors(mask):
        if not (is_call(n, fns={operator.eq, torch.eq}, methods={"eq", "__eq__"}) and len(n.args) == 2):
            continue
        a, b = n.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        X = None
        if is_call(a, fns={operator.getitem}) and is_call(b, fns={operator.getitem}) and a.args[0] is b.args[0]:
            X = a.args[0]
            ex = example(X)
            if ex is None or ex.dim() != 2:
                continue
            B, S = ex.shape
            if {_gather_side(g, B, S, gm, values, static_inputs) for g in (a, b)} != {"q", "kv"}:
                continue
        else:
            ex = example(n)
            S = ex.shape[-1] if ex is not None and ex.dim() >= 2 else None
            sides = [_per_token_side(x, S) for x in (a, b)] if S else [None]
            if None in sides or sides[0][0] is not sides[1][0] or {s for _, s in sides} != {"q", "kv"}:
                continue
            X = sides[0][0]
        if not user_dependent(X, static_inputs):
            continue
        ok, fill = _reaches(n, mask, negated=False)
        if ok:
            return n, X, fill
    return None


def _cast_source(node):
    """``x`` for a value cast of ``x`` to bool or to its own dtype (a device move), else None."""
    if not is_call(node, methods={"to", "bool"}):
        return None
    src, e_in, e_out = node.args[0], example(node.args[0]), example(node)
    if e_in is None or e_out is None or tuple(e_in.shape) != tuple(e_out.shape):
        return None
    return src if e_out.dtype in (torch.bool, e_in.dtype) else None


def key_source(factor: fx.Node, gm, values, static_inputs):
    """The [B or 1, S] tensor whose values at the keys a per-key factor is — through bool casts,
    broadcast views (``X[:, None, None, :]``) or the index gather ``X[arange(B), arange(S)]`` —
    else None. Carrying the source instead of the factor keeps the gather over global key
    indices out of the sharded graph (it would need the whole of ``X`` on every rank)."""
    S = example(factor).shape[-1]
    n = factor
    for _ in range(16):
        ex = example(n)
        if not isinstance(ex, torch.Tensor):
            return None
        if ex.dim() == 2 and ex.shape[-1] == S:
            return n
        cast = _cast_source(n)
        if cast is not None:
            n = cast
            continue
        if is_call(n, methods={"view", "reshape", "unsqueeze", "contiguous"}) or \
                is_call(n, fns={torch.unsqueeze, torch.reshape}) or \
                (is_call(n, fns={operator.getitem}) and _views_only(n.args[1])):
            n = n.args[0]
            continue
        if is_call(n, fns={operator.getitem}) and isinstance(n.args[0], fx.Node):
            X, ex_x = n.args[0], example(n.args[0])
            if ex_x is not None and ex_x.dim() == 2 and ex_x.shape[-1] == S and \
                    _gather_side(n, ex_x.shape[0], S, gm, values, static_inputs) == "kv":
                n = X
                continue
        return None
    return None


def padding_factor(mask: fx.Node, static_inputs, negated: bool, stop: frozenset = frozenset()):
    """A key-padding factor of ``mask`` (module doc): a user-dependent bool node of shape
    [B or 1, 1, 1, S] (or [B or 1, 1, S]) reaching the mask as one factor. Returns (node,
    finite fill or None) or None; the node marks visible keys, or hidden ones with ``negated``."""
    S = example(mask).shape[-1]
    for n in ancestors(mask, stop):
        ex = example(n)
        if (ex is None or not isinstance(ex, torch.Tensor) or ex.dtype != torch.bool or ex.dim() not in (3, 4)
                or ex.shape[-1] != S or any(d != 1 for d in ex.shape[1:-1])):
            continue
        if not user_dependent(n, static_inputs, stop):
            continue
        ok, fill = _reaches(n, mask, negated)
        if ok:
            return n, fill
    return None


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


def packed_position_terms(mask, eq, doc, gm, values, static_inputs):
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


