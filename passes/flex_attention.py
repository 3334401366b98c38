"""``flex_attention`` whose mods are provably the ring's mask and score semantics → the canonical node.

Reads Dynamo's ``node.meta["example_value"]`` and the ``mask_mod`` / ``score_mod`` subgraphs of
``torch.ops.higher_order.flex_attention``; rewrites the graph in place.

The ring carries masks and score semantics as data, so a mod is accepted only by evaluation,
like every mask (``mask_proof``) and bias (``score_bias``): it is evaluated once on the global
indices (b, h, q_idx, kv_idx broadcast to [B, H, S, S]) with its captured buffers.

* ``mask_mod``: static buffers are evaluated; a buffer computed from user input may appear only
  as a same-document factor ``doc[b, q_idx] == doc[b, kv_idx]`` reached through conjunctions
  (``doc`` [B, S], a user input or computed from one). The rest must be exactly a band of
  positions (no mask, causal, a sliding or local window); the document factor becomes ``doc_ids``.
* ``score_mod``: ``score``, or ``cap · tanh(score / cap)`` (Gemma 2's soft-cap → ``softcap``),
  plus terms that do not read the score, evaluated on the global indices and proved an ALiBi
  bias (per-head slopes times ``kv_idx − q_idx``, up to a per-row constant → ``alibi_slopes``).
  Any other score_mod, or one reading user data, stays as it is (and falls back).

Only the output is read (not the LSE). A block mask built inside the compiled region
(``create_block_mask`` in ``forward``) leaves a vmapped computation of the block tables; once the
attention no longer reads them it is dead and removed, including its in-place ``setitem``s and
the vmap level bookkeeping (left in, its ``arange(S)`` would be sliced like positions and the
tables would not match).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .attention_forms import peel_softcap
from .mask_proof import ancestors, band_of, evaluate, evaluate_mask_term, example, is_call, user_dependent
from .score_bias import prove_score_terms

__all__ = ["canonicalize_flex_attention"]

_FLEX = getattr(torch.ops.higher_order, "flex_attention", None)
_VMAP_BOOKKEEPING = ("_vmap_increment_nesting", "_vmap_decrement_nesting", "lazy_load_decompositions")


def _indices(shape):
    """The global (b, h, q_idx, kv_idx) a mod is evaluated on, broadcast to [B, H, S, S]."""
    B, H, S, _ = shape
    r = torch.arange
    return r(B).view(B, 1, 1, 1), r(H).view(1, H, 1, 1), r(S).view(1, 1, S, 1), r(S).view(1, 1, 1, S)


def _sub_values(gm, sub: fx.GraphModule, n_index: int, shape, buffers, values, static_inputs):
    """(placeholders, values, static placeholders, {placeholder: outer node}) of a mod subgraph:
    index placeholders get the global indices, static captured buffers their evaluated values;
    a buffer computed from user input stays opaque (no value, not static)."""
    ph = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if len(ph) != n_index + len(buffers):
        raise _Unprovable("placeholders")
    sub_values, static, outer = {}, set(), {}
    index = _indices(shape)
    for p, idx in zip(ph[n_index - 4:n_index], index):
        sub_values[p] = idx
        static.add(p)
    for p, b in zip(ph[n_index:], buffers):
        outer[p] = b
        if isinstance(b, fx.Node) and user_dependent(b, static_inputs):
            continue
        sub_values[p] = evaluate(gm, b, values) if isinstance(b, fx.Node) else b
        static.add(p)
    return ph, sub_values, static, outer


class _Unprovable(Exception):
    pass


def _result(sub: fx.GraphModule):
    out = next(n for n in sub.graph.nodes if n.op == "output")
    result = out.args[0]
    return result[0] if isinstance(result, (tuple, list)) and len(result) == 1 else result


def _mask_mod_kind(gm, mask_mod: fx.GraphModule, buffers, values, static_inputs, shape):
    """(band ``AttentionSpec``, doc node or None, visible [B, H, S, S]) of a ``mask_mod``, or None.

    Proved like every mask (``mask_proof.evaluate_mask_term``): the subgraph is evaluated on the
    global indices with its static buffers; a buffer computed from user input may appear only
    as the same-document factor ``doc[b, q_idx] == doc[b, kv_idx]`` reached by conjunctions
    (that factor is evaluated as all-true and ``doc`` becomes the node's ``doc_ids``)."""
    ph, sub_values, static, outer = _sub_values(gm, mask_mod, 4, shape, buffers, values, static_inputs)
    term = evaluate_mask_term(_result(mask_mod), mask_mod, sub_values, static)
    if term is None or term.key_padding is not None:
        return None
    value, doc = term.value, term.doc
    if value.dtype != torch.bool:
        return None
    visible = torch.broadcast_to(value, shape)
    band = band_of(visible, shape[-1])
    if band is None:
        return None
    if doc is not None:
        doc = outer.get(doc)                   # the document tensor must be a captured buffer itself
        ex = example(doc)
        if not isinstance(doc, fx.Node) or ex is None or tuple(ex.shape) != (shape[0], shape[-1]):
            return None
    return band, doc, visible


_ADDS = {operator.add, torch.add}
_SUBS = {operator.sub, torch.sub}


def _score_mod_terms(gm, score_mod: fx.GraphModule, buffers, values, static_inputs, shape):
    """(softcap or None, additive bias [B, H, S, S] or None) of a ``score_mod`` that is exactly
    ``score``, ``cap · tanh(score / cap)``, either plus terms that do not read the score (an ALiBi
    bias, proved by the caller), else None.

    Why structure first, then evaluation: a bias is a function of the indices alone, so it is
    evaluated on the global indices (as a mask is); the score itself must reach the output only
    through the soft-cap and additions, since nothing else is a score semantics the ring carries."""
    ph, sub_values, static, outer = _sub_values(gm, score_mod, 5, shape, buffers, values, static_inputs)
    if len(static) != len(ph) - 1:
        return None                            # a score_mod reading user data
    score = ph[0]
    n, bias_nodes = _result(score_mod), []
    while is_call(n, fns=_ADDS | _SUBS, methods={"add", "sub", "__add__", "__sub__"}) and len(n.args) == 2 \
            and not n.kwargs:
        a, b = n.args
        sign = -1.0 if n.target in _SUBS or n.target in ("sub", "__sub__") else 1.0
        a_reads = isinstance(a, fx.Node) and score in set(ancestors(a))
        b_reads = isinstance(b, fx.Node) and score in set(ancestors(b))
        if a_reads and not b_reads:
            bias_nodes.append((sign, b))
            n = a
        elif b_reads and not a_reads and sign > 0:
            bias_nodes.append((1.0, a))
            n = b
        else:
            return None
    cap = None
    if n is not score:
        n, cap = peel_softcap(n)
        if cap is None or n is not score:
            return None
    bias = None
    for sign, term in bias_nodes:
        value = evaluate(score_mod, term, sub_values) if isinstance(term, fx.Node) else torch.tensor(float(term))
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() and value.dtype != torch.int64:
            return None
        value = sign * torch.broadcast_to(value.double(), shape)
        bias = value if bias is None else bias + value
    return cap, bias


def _match(gm, node, values, static_inputs):
    """The ``_Proof`` of a ``flex_attention`` call whose mods are provable, else None."""
    from .attention_patterns import _Proof
    q, k, v, score_mod, block_mask, scale, *rest = node.args
    score_buffers = rest[1] if len(rest) > 1 else ()
    mask_buffers = rest[2] if len(rest) > 2 else ()
    eq, ek = example(q), example(k)
    if eq is None or eq.dim() != 4 or ek.shape[-2] != eq.shape[-2]:
        return None
    if any(not (u.target is operator.getitem and (u.args[1] == 0 or not u.users)) for u in node.users):
        return None
    mask_mod = block_mask[-1]
    if not (isinstance(mask_mod, fx.Node) and mask_mod.op == "get_attr"):
        return None
    S = eq.shape[-2]
    if tuple(block_mask[:2]) != (S, S):
        return None
    shape = (eq.shape[0], eq.shape[1], S, S)
    masked = _mask_mod_kind(gm, getattr(gm, mask_mod.target), mask_buffers, values, static_inputs, shape)
    if masked is None:
        return None
    band, doc, visible = masked
    terms = _score_mod_terms(gm, getattr(gm, score_mod.target), score_buffers, values, static_inputs, shape)
    if terms is None:
        return None
    cap, bias = terms
    slopes = table = None
    if bias is not None:
        proved = prove_score_terms([("visible", visible), ("additive", bias)], shape, S)
        if proved is None or proved[0] != band:
            return None
        slopes, table = proved[1], proved[2]
    scale = float(scale if scale is not None else eq.shape[-1] ** -0.5)
    spec = band.with_(scale=scale, docs=doc is not None, alibi=slopes is not None, rel_bias=table is not None,
                      softcap=cap)
    return _Proof(q, k, v, spec, doc, None, slopes, table)


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
    from .attention_patterns import _canonical_node   # one place emits the node (and ALiBi slopes as buffers)
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
            new = _canonical_node(gm, found)
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
