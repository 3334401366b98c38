"""Hand-written attention → one canonical attention node, its masks and biases proved.

Reads Dynamo's ``node.meta["example_value"]``; rewrites the graph in place: the chain

    scores = scale · q kᵀ                       (matmul, einsum or baddbmm: attention_forms)
    scores = cap · tanh(scores / cap)            (optional: Gemma 2 soft-capping)
    scores = (q kᵀ [+ bias | mask]) · scale      (or terms added before the scale: MPT-style ALiBi)
    scores = scores [+ bias] [+ mask | masked_fill(hidden, -inf | finfo.min) | where(visible, ·, ·)]
    probs  = softmax(scores, -1) [.to(dtype)] [dropout(p=0)]
    out    = probs @ v                           (matmul or einsum)

becomes ``canonical_attention(q, k, v, causal, window, doc_ids, scale[, alibi_slopes, softcap])``
(GQA's repeated K/V folded away: the ring sends the small K/V). ``F.scaled_dot_product_attention``
with an explicit ``attn_mask`` (what transformers passes for sliding windows; an additive ALiBi
bias) goes the same way; ``F.multi_head_attention_forward`` is decomposed first
(``mha_attention``).

Masks and biases are proved, never guessed: each term is evaluated once at the global sequence
length (``mask_proof``) and must equal the ring's data — causal / window / same-document
visibility and per-head ALiBi slopes over global positions (``score_bias``). Anything else is
left alone, so the graph falls back to the gather path.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .attention_forms import emit, match_scores, match_value_product, peel_softcap, to_bhsd, unrepeat_kv
from .mask_proof import evaluate, evaluate_mask_term, example, is_call, is_hidden_value, user_dependent
from .score_bias import prove_score_terms

__all__ = ["canonical_attention", "canonicalize_handwritten_attention"]


def canonical_attention(q, k, v, causal: bool, window: int | None, doc_ids, scale: float,
                        alibi_slopes=None, softcap: float | None = None):
    """Single-device meaning of the canonical node.

    scores = scale · q kᵀ; ← softcap · tanh(scores / softcap) if softcap; += slopes[h] · (j − i)
    if alibi_slopes; keys hidden by the mask (causal: j ≤ i; window W: i − W < j ≤ i; doc_ids:
    same document) get −inf; softmax over keys; @ v. k/v are broadcast over query-head groups.

    Shapes: q [B, Hq, S, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], doc_ids [B, S] or None,
    alibi_slopes [Hq] (fp32) or None; returns [B, Hq, S, Dv]. Nothing is sharded here: this is
    the replicated meaning the ring op must reproduce.
    """
    S = q.shape[-2]
    mask = None
    i = torch.arange(S, device=q.device)
    if causal or window is not None:
        diff = i[:, None] - i[None, :]
        mask = diff >= 0
        if window is not None:
            mask &= diff < window
    if doc_ids is not None:
        same = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    if alibi_slopes is None and softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (k, v))
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(compute) @ k.to(compute).transpose(-2, -1)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        rel = (i[None, :] - i[:, None]).to(compute)                          # j − i
        scores = scores + alibi_slopes.to(compute)[:, None, None] * rel
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, -1) @ v.to(compute)).to(v.dtype)


_SOFTMAX = {F.softmax, torch.softmax}
_CASTS = {"to", "type", "float", "type_as", "half", "bfloat16", "contiguous"}
_ADD = {operator.add, torch.add}


def _strip_probs(node):
    """Walk back from the second product's probs through casts and p=0 dropout."""
    while True:
        if is_call(node, methods=_CASTS):
            node = node.args[0]
        elif is_call(node, fns={F.dropout}):
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            if p and training:
                raise ValueError(f"seqpar: attention dropout p={p} is not supported yet (no per-block RNG); "
                                 f"use p=0 in attention")
            node = node.args[0]
        else:
            return node


def _hides(value, dtype, gm, values, static_inputs) -> bool:
    """``value`` (a fill) hides a key: −inf or at most half the lowest ``dtype`` value (the
    ``finfo.min`` that GPT-NeoX and x-transformers fill with), a constant or a static scalar."""
    if isinstance(value, fx.Node):
        if user_dependent(value, static_inputs) or example(value) is None or example(value).numel() != 1:
            return False
        value = float(evaluate(gm, value, values))
    return isinstance(value, (int, float)) and value <= torch.finfo(dtype).min / 2


def _peel_terms(scores, gm, values, static_inputs):
    """Peel masks and additive terms off the scores: (logits, terms, doc) or None, with
    ``terms`` as ``score_bias.prove_score_terms`` takes them."""
    n, terms, docs = scores, [], set()
    dtype = example(scores).dtype

    def add_term(kind, node, negated=False):
        found = evaluate_mask_term(node, gm, values, static_inputs, negated)
        if found is None:
            return False
        value, doc = found
        if negated:
            value = ~value
        terms.append((kind, value))
        if doc is not None:
            docs.add(doc)
        return True
    for _ in range(4):
        if is_call(n, fns={torch.masked_fill}, methods={"masked_fill"}):
            logits, mask, fill = n.args[:3]
            if not _hides(fill, dtype, gm, values, static_inputs) or not isinstance(mask, fx.Node):
                return None
            if is_call(mask, fns={operator.invert, torch.logical_not}, methods={"logical_not", "__invert__"}):
                ok = add_term("visible", mask.args[0])
            else:
                ok = add_term("visible", mask, negated=True)
        elif is_call(n, fns={torch.where}) and len(n.args) == 3:
            mask, logits, fill = n.args
            if not _hides(fill, dtype, gm, values, static_inputs):
                return None
            ok = add_term("visible", mask)
        elif is_call(n, fns=_ADD, methods={"add", "__add__"}) and len(n.args) == 2 and not n.kwargs:
            a, b = n.args
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                return None
            ok = False
            for logits, term in ((a, b), (b, a)):
                ex = example(term)
                if ex is not None and ex.is_floating_point() and add_term("additive", term):
                    ok = True
                    break
        else:
            break
        if not ok:
            return None
        n = logits
    if len(docs) > 1:
        return None
    return n, terms, next(iter(docs), None)


def _scale_of(node):
    """(inner, scale) for ``inner * c`` / ``inner / c`` with a constant c, else (node, 1.0)."""
    if is_call(node, fns={operator.mul, torch.mul}) and isinstance(node.args[1], (int, float)):
        return node.args[0], float(node.args[1])
    if is_call(node, fns={operator.truediv, torch.div}) and isinstance(node.args[1], (int, float)):
        return node.args[0], 1.0 / float(node.args[1])
    return node, 1.0


def _scaled_term(kind: str, value: torch.Tensor, scale: float) -> torch.Tensor:
    """A score term peeled from below a positive scale, as it reaches the softmax: finite
    entries times ``scale``, hidden ones still hidden (−inf, whatever ``finfo.min · scale`` is)."""
    if kind != "additive" or not value.is_floating_point():
        return value
    return torch.where(is_hidden_value(value), float("-inf"), value * scale)


def _match(node, gm, values, static_inputs):
    """The canonical arguments (q, k, v, causal, window, doc, scale, slopes, cap) of
    ``out = probs @ v`` and the permutes to apply first, or None."""
    vf = match_value_product(node)
    if vf is None:
        return None
    sm = _strip_probs(vf.probs)
    if not is_call(sm, fns=_SOFTMAX, methods={"softmax"}):
        return None
    dim = sm.kwargs.get("dim", sm.args[1] if len(sm.args) > 1 else None)
    scores = sm.args[0]
    ex = example(scores)
    if ex is None or ex.dim() != 4 or dim not in (-1, 3) or ex.shape[-2] != ex.shape[-1]:
        return None
    peeled = _peel_terms(scores, gm, values, static_inputs)
    if peeled is None:
        return None
    logits, terms, doc = peeled
    logits, cap = peel_softcap(logits)
    logits, scale = _scale_of(logits)
    if cap is None and scale > 0 and match_scores(logits) is None:
        inner = _peel_terms(logits, gm, values, static_inputs)   # (q kᵀ + bias) · s: terms before the scale
        if inner is not None and inner[1]:
            if doc is not None and inner[2] is not None and inner[2] is not doc:
                return None
            logits, doc = inner[0], doc if doc is not None else inner[2]
            terms += [(kind, _scaled_term(kind, value, scale)) for kind, value in inner[1]]
    sf = match_scores(logits)
    if sf is None:
        return None
    scale *= sf.scale
    if sf.bias is not None:                 # baddbmm(bias, q, kᵀ, beta, alpha): Bloom's ALiBi
        if cap is not None or user_dependent(sf.bias, static_inputs):
            return None
        B, H, S, _ = ex.shape
        bias = evaluate(gm, sf.bias, values).broadcast_to(B * H, S, S).reshape(B, H, S, S)
        terms.append(("additive", bias * (sf.bias_beta * scale / sf.scale)))
    proved = prove_score_terms(terms, tuple(ex.shape), ex.shape[-1])
    if proved is None:
        return None
    causal, window, slopes = proved
    return sf, vf, causal, window, doc, scale, slopes, cap


_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def _match_sdpa(node, gm, values, static_inputs):
    """SDPA with an explicit ``attn_mask`` that is provably causal / a window / nothing (plus an
    ALiBi bias when it is float), or with K/V repeated for GQA (folded, so the ring sends Hkv
    heads): (q, k, v, causal, window, doc, scale, slopes) or None."""
    if not is_call(node, fns=_SDPA):
        return None
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    if a.get("dropout_p"):
        return None
    q = example(a["query"])
    if q is None or q.dim() != 4 or example(a["key"]).shape[-2] != q.shape[-2]:
        return None
    S = q.shape[-2]
    k, v = unrepeat_kv(a["key"]), unrepeat_kv(a["value"])
    slopes = None
    if a.get("attn_mask") is None:
        if k is a["key"] and v is a["value"]:
            return None                                    # plain SDPA: handled as it is
        causal, window, doc = bool(a.get("is_causal")), None, None
    elif a.get("is_causal"):
        return None
    else:
        found = evaluate_mask_term(a["attn_mask"], gm, values, static_inputs)
        if found is None:
            return None
        value, doc = found
        proved = prove_score_terms([("visible" if value.dtype == torch.bool else "additive", value)],
                                   (*q.shape[:-1], S), S)
        if proved is None:
            return None
        causal, window, slopes = proved
    scale = a.get("scale") if a.get("scale") is not None else q.shape[-1] ** -0.5
    return a["query"], k, v, causal, window, doc, scale, slopes


def _slopes_node(gm: fx.GraphModule, slopes: torch.Tensor, like: fx.Node) -> fx.Node:
    """A ``get_attr`` of the proved ALiBi slopes [H] (fp32, a non-persistent buffer of ``gm``)."""
    ex = example(like)
    name = f"_seqpar_alibi_slopes_{sum(1 for _ in gm.buffers())}"
    gm.register_buffer(name, slopes.to(ex.device), persistent=False)
    node = gm.graph.get_attr(name)
    fake_mode = getattr(ex, "fake_mode", None)
    node.meta["example_value"] = fake_mode.from_tensor(getattr(gm, name)) if fake_mode else getattr(gm, name)
    return node


def _canonical_node(gm, node, q, k, v, causal, window, doc, scale, slopes=None, cap=None) -> fx.Node:
    """Emit the canonical node before ``node`` (the old two trailing arguments only when used,
    so graphs without ALiBi or soft-capping look as they always did)."""
    args = (q, k, v, causal, window, doc, float(scale))
    if slopes is not None or cap is not None:
        args += (None if slopes is None else _slopes_node(gm, slopes, q), cap)
    return emit(gm.graph, canonical_attention, args)


def _check_operands(q, k, v) -> None:
    """q [B, Hq, S, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] with Hq % Hkv == 0, or raise."""
    eq, ek, ev = (example(t) for t in (q, k, v))
    if not (eq.dim() == ek.dim() == ev.dim() == 4 and eq.shape[0] == ek.shape[0] == ev.shape[0]
            and eq.shape[2] == ek.shape[2] == ev.shape[2] and eq.shape[3] == ek.shape[3]
            and ek.shape[1] == ev.shape[1] and eq.shape[1] % ek.shape[1] == 0):
        raise _NotAttention(f"operands q {tuple(eq.shape)} k {tuple(ek.shape)} v {tuple(ev.shape)}")


class _NotAttention(Exception):
    pass


def _rewrite_one(gm, node, values, static_inputs) -> bool:
    found = _match(node, gm, values, static_inputs)
    with gm.graph.inserting_before(node):
        if found is not None:
            sf, vf, causal, window, doc, scale, slopes, cap = found
            q = to_bhsd(gm.graph, sf.q, sf.q_perm, sf.q_shape)
            k = sf.k if sf.k_perm is not None or sf.k_shape is not None else unrepeat_kv(sf.k)
            k = to_bhsd(gm.graph, k, sf.k_perm, sf.k_shape)
            v = to_bhsd(gm.graph, vf.v if vf.v_perm is not None else unrepeat_kv(vf.v), vf.v_perm)
            _check_operands(q, k, v)
            new = _canonical_node(gm, node, q, k, v, causal, window, doc, scale, slopes, cap)
            if vf.out_perm is not None:
                new = emit(gm.graph, "permute", (new, vf.out_perm), op="call_method")
        else:
            found = _match_sdpa(node, gm, values, static_inputs)
            if found is None:
                return False
            _check_operands(*found[:3])
            new = _canonical_node(gm, node, *found)
    new.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
    node.replace_all_uses_with(new)
    _erase_dead(gm.graph, node)
    return True


def canonicalize_handwritten_attention(gm: fx.GraphModule, example_inputs, static_inputs: set) -> int:
    """Rewrite every provable hand-written attention in ``gm``; return how many."""
    from .flex_attention import canonicalize_flex_attention
    from .mha_attention import decompose_multi_head_attention
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs))
    decompose_multi_head_attention(gm, values, static_inputs)
    count = canonicalize_flex_attention(gm, values, static_inputs)
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False):               # erased as part of an earlier match
            continue
        prev = node.prev                                  # a match emits its nodes right before node
        try:
            count += _rewrite_one(gm, node, values, static_inputs)
        except ValueError:
            raise
        except Exception:  # noqa: BLE001 - an unprovable pattern stays as it is (and falls back)
            emitted, n = [], prev.next                    # (not a scan of the graph: linear compile time)
            while n is not node:
                emitted.append(n)
                n = n.next
            for new in reversed(emitted):
                if not new.users:                         # nodes emitted before the failure
                    gm.graph.erase_node(new)
    gm.graph.lint()
    gm.recompile()
    return count


def _erase_dead(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and every ancestor that only it used (the scores, softmax and mask chain).

    A node reached twice (q used by both products, a mask read by two terms) is erased once: the
    second visit would be torch.fx's "erase_node on an already erased node" warning."""
    stack, erased = [node], set()
    while stack:
        n = stack.pop()
        if n in erased or n.users or n.op not in ("call_function", "call_method"):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)
