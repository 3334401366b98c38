"""Hand-written attention → one canonical attention node, its masks and biases proved.

Reads Dynamo's ``node.meta["example_value"]``; rewrites the graph in place: the chain

    scores = scale · q kᵀ                       (matmul, einsum or baddbmm: attention_forms)
    scores = cap · tanh(scores / cap)            (optional: Gemma 2 soft-capping)
    scores = (q kᵀ [+ bias | mask]) · scale      (or terms added before the scale: MPT-style ALiBi)
    scores = scores [+ bias] [+ mask | masked_fill(hidden, -inf | finfo.min) | where(visible, ·, ·)]
    probs  = softmax(scores, -1) [.to(dtype)] [dropout(p=0)]
    out    = probs @ v                           (matmul or einsum)

becomes ``canonical_attention(q, k, v, spec, doc_ids, key_padding, alibi_slopes, rel_bias)`` with ``spec``
an encoded ``AttentionSpec`` (GQA's repeated K/V folded away: the ring sends the small K/V).
``F.scaled_dot_product_attention`` with an explicit ``attn_mask`` (what transformers passes for
padding and sliding windows; an additive ALiBi bias) goes the same way;
``F.multi_head_attention_forward`` is decomposed first (``mha_attention``).

Masks and biases are proved, never guessed: each term is evaluated once at the global sequence
length (``mask_proof``) and must equal the spec's data — a band of visible positions,
same-document and key-padding factors carried as per-token tensors, per-head ALiBi slopes or a
per-head table of the offset over global positions (``score_bias``). Anything else is left alone, so the graph falls back to the
gather path.

One thing a spec does not say: a query whose every key is hidden. SDPA with a boolean mask
gives it 0 (the spec's contract); a float mask or ``masked_fill`` with a finite fill
(``finfo.min``) gives it the mean of all values in eager. Only key padding can hide every key
of a query (bands hold the diagonal, a token is in its own document), so key padding hidden by a
finite fill is refused.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from seqpar_compiler.kernels import AttentionSpec

from .alias_sets import eliminate_dead_code
from .attention_forms import emit, match_scores, match_value_product, peel_softcap, to_bhsd, unrepeat_kv
from .learned_bias import learned_offset_table
from .mask_proof import (ProvedTerm, band_of, chunk_documents, evaluate, evaluate_mask_term, example, is_call,
                         is_hidden_value, user_dependent)
from .score_bias import prove_score_terms
from .token_masks import CARRIER

__all__ = ["UNPROVED", "canonical_attention", "canonical_spec", "canonicalize_handwritten_attention"]

# ``node.meta`` key: why an attention of a known form was left alone (the fallback warning says it)
UNPROVED = "seqpar_unproved"


def canonical_attention(q, k, v, spec: str, doc_ids=None, key_padding=None, alibi_slopes=None, rel_bias=None):
    """Single-device meaning of the canonical node: the ``AttentionSpec`` that ``spec`` encodes.

    scores = scale · q kᵀ; ← softcap · tanh(scores / softcap) with a softcap; += slopes[h] ·
    (j − i) with ALiBi; += rel_bias[h, j − i + S − 1] with a relative-position table; keys outside the band ``-behind <= j - i <= ahead``, of another document
    or invalid (``key_padding`` False) get −inf; softmax over keys (a query with no visible key
    gets 0); @ v. k/v are broadcast over query-head groups.

    Shapes: q [B, Hq, S, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], doc_ids [B, S] or None,
    key_padding [B, S] bool or None, alibi_slopes [Hq] (fp32) or None, rel_bias [Hq, 2S − 1] or None;
    returns [B, Hq, S, Dv].
    Nothing is sharded here: this is the replicated meaning the ring op must reproduce.
    """
    sp = AttentionSpec.decode(spec)
    S = q.shape[-2]
    mask = None
    i = torch.arange(S, device=q.device)
    ahead = i[None, :] - i[:, None]                                          # j − i
    if sp.ahead is not None:
        mask = ahead <= sp.ahead
    if sp.behind is not None:
        mask = (-ahead <= sp.behind) if mask is None else mask & (-ahead <= sp.behind)
    if doc_ids is not None:
        same = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    if key_padding is not None:
        valid = key_padding[:, None, None, :]
        mask = valid if mask is None else mask & valid
    if sp.softcap is None:
        # SDPA: GQA without repeating K/V, and 0 for a query with no visible key
        attn_mask = mask
        bias = _position_bias(alibi_slopes, rel_bias, ahead, q.dtype)
        if bias is not None:
            attn_mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=sp.scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (k, v))
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(compute) @ k.to(compute).transpose(-2, -1)) * sp.scale
    scores = sp.softcap * torch.tanh(scores / sp.softcap)
    bias = _position_bias(alibi_slopes, rel_bias, ahead, compute)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.ops.aten._safe_softmax(scores, -1)                    # no visible key: 0, not NaN
    return (probs @ v.to(compute)).to(v.dtype)


def _position_bias(alibi_slopes, rel_bias, ahead, dtype):
    """[Hq, S, S] bias of the ALiBi slopes and the relative-position table (``ahead`` = j − i), or None."""
    bias = None if alibi_slopes is None else alibi_slopes.to(dtype)[:, None, None] * ahead.to(dtype)
    if rel_bias is not None:
        S = ahead.shape[0]
        rel = rel_bias.to(dtype)[:, ahead + S - 1]
        bias = rel if bias is None else bias + rel
    return bias


def canonical_spec(node: fx.Node) -> AttentionSpec:
    """The ``AttentionSpec`` of a ``canonical_attention`` node."""
    return AttentionSpec.decode(node.args[3])


_SOFTMAX = {F.softmax, torch.softmax}
_CASTS = {"to", "type", "float", "type_as", "half", "bfloat16", "contiguous"}
_ADD = {operator.add, torch.add}


def _strip_probs(node):
    """Walk back from the second product's probs through casts, p=0 dropout and
    ``nan_to_num(0)`` (what a query with no visible key gets: 0, as the spec says)."""
    while True:
        if is_call(node, methods=_CASTS):
            node = node.args[0]
        elif is_call(node, fns={torch.nan_to_num}, methods={"nan_to_num"}) and \
                node.kwargs.get("nan", node.args[1] if len(node.args) > 1 else 0.0) == 0.0:
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


@dataclass
class _Peeled:
    """What ``_peel_terms`` took off the scores: the score terms (as ``prove_score_terms`` takes
    them) and the per-token factors their masks read."""

    logits: fx.Node
    terms: list = field(default_factory=list)
    docs: list = field(default_factory=list)
    paddings: list = field(default_factory=list)     # (node, hides)
    finite_fill: bool = False                       # a key-padding factor hidden by a finite fill
    learned: list = field(default_factory=list)     # LearnedTable of additive terms that require grad
    learned_refused: bool = False                   # a term that requires grad and is no such table

    def add(self, term: ProvedTerm, kind: str, negated: bool = False) -> None:
        self.terms.append((kind, ~term.value if negated else term.value))
        if term.doc is not None and term.doc not in self.docs:
            self.docs.append(term.doc)
        if term.key_padding is not None:
            self.paddings.append((term.key_padding, term.key_padding_hides, term.key_source))
            self.finite_fill |= term.finite_fill

    def merge(self, other: _Peeled) -> None:
        self.terms += other.terms
        self.learned += other.learned
        self.docs += [d for d in other.docs if d not in self.docs]
        self.paddings += other.paddings
        self.finite_fill |= other.finite_fill

    def tokens(self):
        """(doc node, (key-padding node, hides)) or None when the factors are more than one
        of each (two document ids or two padding masks: the spec carries one)."""
        if len(self.docs) > 1 or len(self.paddings) > 1:
            return None
        return (self.docs[0] if self.docs else None), (self.paddings[0] if self.paddings else None)


def _peel_terms(scores, gm, values, static_inputs) -> _Peeled | None:
    """Peel casts, masks and additive terms off the scores (``_Peeled``), or None when a mask or
    term is not provable."""
    dtype = example(scores).dtype
    shape = tuple(example(scores).shape)
    peeled = _Peeled(scores)
    n = scores

    def add_term(kind, node, negated=False, fill=None):
        if getattr(example(node), "requires_grad", False):
            # proved by value it would be a constant, its gradient lost: only a learned table of
            # the offset stays a function of its weight (learned_bias)
            if user_dependent(node, static_inputs):
                return False
            learned = None if kind != "additive" or len(shape) != 4 else \
                learned_offset_table(node, gm, values, static_inputs, shape)
            if learned is None:
                peeled.learned_refused = True
                return False
            peeled.learned.append(learned)
            return True
        term = evaluate_mask_term(node, gm, values, static_inputs, negated, at=n)
        if term is None:
            return False
        if term.key_padding is not None and fill is not None and fill != float("-inf"):
            term.finite_fill = True
        peeled.add(term, kind, negated)
        return True
    for _ in range(6):
        if is_call(n, methods=_CASTS - {"contiguous"}) and example(n) is not None and example(n).is_floating_point():
            n = n.args[0]                                   # scores upcast before the softmax (MPT)
            continue
        if is_call(n, fns={torch.masked_fill}, methods={"masked_fill"}):
            logits, mask, fill = n.args[:3]
            if not _hides(fill, dtype, gm, values, static_inputs) or not isinstance(mask, fx.Node):
                return None
            fill = _constant_fill(fill, gm, values)
            if is_call(mask, fns={operator.invert, torch.logical_not}, methods={"logical_not", "__invert__"}):
                ok = add_term("visible", mask.args[0], fill=fill)
            else:
                ok = add_term("visible", mask, negated=True, fill=fill)
        elif is_call(n, fns={torch.where}) and len(n.args) == 3:
            mask, logits, fill = n.args
            if not _hides(fill, dtype, gm, values, static_inputs):
                return None
            ok = add_term("visible", mask, fill=_constant_fill(fill, gm, values))
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
            return _LEARNED_BIAS if peeled.learned_refused else None
        n = logits
    peeled.logits = n
    return peeled


def _constant_fill(fill, gm, values) -> float:
    return float(evaluate(gm, fill, values)) if isinstance(fill, fx.Node) else float(fill)


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


@dataclass
class _Proof:
    """A proved attention: its operands (old graph nodes), its spec, the per-token factor nodes
    the ALiBi slopes and the relative-position table (tensors) or None."""

    q: fx.Node
    k: fx.Node
    v: fx.Node
    spec: AttentionSpec
    doc: fx.Node | None = None
    padding: tuple | None = None          # (per-key factor node, hides, its [B, S] source or None)
    slopes: torch.Tensor | None = None
    table: torch.Tensor | _LearnedTerms | None = None


_LEARNED_BIAS = ("a score bias that requires grad and is not a learned function of k - q (an embedding looked "
                 "up at static indices of the offset, as T5's): its gradient could not reach its parameters")
_FINITE_FILL = ("a padding mask hidden by a finite fill (finfo.min): a query whose every key is padding "
                "averages all values in eager, which the ring does not reproduce; hide keys with -inf or "
                "use F.scaled_dot_product_attention with a boolean mask")


def _prove(peeled: _Peeled, shape: tuple, scale: float, cap: float | None):
    """(spec, doc, padding, slopes, table) of peeled terms, None when they prove no spec, or a reason
    string when they are a known form the ring does not carry."""
    tokens = peeled.tokens()
    if tokens is None:
        return None
    doc, padding = tokens
    if padding is not None and peeled.finite_fill:
        return _FINITE_FILL
    proved = prove_score_terms(peeled.terms, shape, shape[-1])
    if proved is None:
        return None
    band, slopes, table = proved
    if peeled.learned:
        table = _LearnedTerms(peeled.learned, table)
    spec = band.with_(scale=float(scale), docs=doc is not None, key_padding=padding is not None,
                      alibi=slopes is not None, rel_bias=table is not None, softcap=cap)
    return spec, doc, padding, slopes, table


@dataclass
class _LearnedTerms:
    """A relative-position table computed in the graph: the learned tables' sum, plus the
    proved fixed table [H, 2S − 1] when there is one."""

    learned: list
    fixed: torch.Tensor | None


def _match(node, gm, values, static_inputs):
    """(scores form, value form, proof) of ``out = probs @ v``, or None."""
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
    if peeled is None or isinstance(peeled, str):
        return peeled
    logits, cap = peel_softcap(peeled.logits)
    logits, scale = _scale_of(logits)
    if cap is None and scale > 0 and match_scores(logits) is None:
        inner = _peel_terms(logits, gm, values, static_inputs)   # (q kᵀ + bias) · s: terms before the scale
        if isinstance(inner, str):
            return inner
        if inner is not None and inner.learned:
            return _LEARNED_BIAS                     # a learned table under the scale: not carried
        if inner is not None and inner.terms:
            inner.terms = [(kind, _scaled_term(kind, value, scale)) for kind, value in inner.terms]
            peeled.merge(inner)
            logits = inner.logits
    sf = match_scores(logits)
    if sf is None:
        return None
    scale *= sf.scale
    if sf.bias is not None:                 # baddbmm(bias, q, kᵀ, beta, alpha): Bloom's ALiBi
        if cap is not None or user_dependent(sf.bias, static_inputs):
            return None
        if getattr(example(sf.bias), "requires_grad", False):
            return _LEARNED_BIAS                    # its only inputs are parameters (not user-dependent)
        B, H, S, _ = ex.shape
        bias = evaluate(gm, sf.bias, values, at=logits).broadcast_to(B * H, S, S).reshape(B, H, S, S)
        peeled.terms.append(("additive", bias * (sf.bias_beta * scale / sf.scale)))
    proved = _prove(peeled, tuple(ex.shape), scale, cap)
    return proved if proved is None or isinstance(proved, str) else (sf, vf, proved)


_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def _match_sdpa(node, gm, values, static_inputs) -> _Proof | None:
    """SDPA with an explicit ``attn_mask`` that is provably a spec (a band, documents, key
    padding, plus an ALiBi bias when it is float), or with K/V repeated for GQA (folded, so the
    ring sends Hkv heads), or None."""
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
    scale = a.get("scale") if a.get("scale") is not None else q.shape[-1] ** -0.5
    if a.get("attn_mask") is None:
        if k is a["key"] and v is a["value"]:
            return None                                    # plain SDPA: handled as it is
        return _Proof(a["query"], k, v, AttentionSpec.of(causal=bool(a.get("is_causal")), scale=float(scale)))
    if a.get("is_causal"):
        return None
    if getattr(example(a["attn_mask"]), "requires_grad", False):
        return _learned_sdpa_mask(a, k, v, scale, gm, values, static_inputs)
    term = evaluate_mask_term(a["attn_mask"], gm, values, static_inputs, at=node)
    if term is None:
        return None
    _chunks_as_documents(term, a["attn_mask"], q.shape[0], S, gm)
    peeled = _Peeled(a["attn_mask"])
    peeled.add(term, "visible" if term.value.dtype == torch.bool else "additive")
    proved = _prove(peeled, (*q.shape[:-1], S), scale, None)
    return proved if proved is None or isinstance(proved, str) else _Proof(a["query"], k, v, *proved)


def _chunks_as_documents(term: ProvedTerm, mask: fx.Node, B: int, S: int, gm: fx.GraphModule) -> None:
    """A static chunked mask (a band within chunks of consecutive positions: Llama 4) becomes
    the band and documents: the chunk ids [B, S] (position // chunk) as a buffer of ``gm``."""
    if term.doc is not None or term.key_padding is not None:
        return
    m = term.value
    if m.dtype == torch.bool:
        visible = m
    elif m.is_floating_point() and bool(((m == 0) | is_hidden_value(m)).all()):
        visible = m == 0
    else:
        return
    if band_of(visible, S) is not None:
        return
    found = chunk_documents(visible, S)
    if found is None:
        return
    band, ids = found
    term.doc = _slopes_node(gm, ids.expand(B, S).contiguous(), mask, "chunk_ids")
    term.value = band.view(1, 1, S, S) if m.dtype == torch.bool else torch.zeros(1, 1, S, S, dtype=m.dtype).masked_fill(
        ~band.view(1, 1, S, S), float("-inf"))


def _learned_sdpa_mask(a: dict, k, v, scale, gm, values, static_inputs):
    """SDPA whose float ``attn_mask`` requires grad (transformers' T5 under SDPA: the learned
    bias, with the padding or causal mask written into it by ``torch.where``): its masks and
    fixed terms are peeled as scores' would be, and what remains must be a learned table."""
    mask = a["attn_mask"]
    while is_call(mask, methods={"contiguous"}):
        mask = mask.args[0]
    peeled = _peel_terms(mask, gm, values, static_inputs)
    if peeled is None or isinstance(peeled, str):
        return _LEARNED_BIAS if peeled is None else peeled
    q = example(a["query"])
    shape = (*q.shape[:-1], q.shape[-2])
    learned = learned_offset_table(peeled.logits, gm, values, static_inputs, shape) \
        if getattr(example(peeled.logits), "requires_grad", False) else None
    if learned is None:
        return _LEARNED_BIAS
    peeled.learned.append(learned)
    proved = _prove(peeled, shape, scale, None)
    return proved if proved is None or isinstance(proved, str) else _Proof(a["query"], k, v, *proved)


def _slopes_node(gm: fx.GraphModule, slopes: torch.Tensor, like: fx.Node, what: str = "alibi_slopes") -> fx.Node:
    """A ``get_attr`` of proved score data (ALiBi slopes [H], a relative-position table [H, 2S − 1];
    fp32, a non-persistent buffer of ``gm``)."""
    ex = example(like)
    name = f"_seqpar_{what}_{sum(1 for _ in gm.buffers())}"
    gm.register_buffer(name, slopes.to(ex.device), persistent=False)
    node = gm.graph.get_attr(name)
    fake_mode = getattr(ex, "fake_mode", None)
    node.meta["example_value"] = fake_mode.from_tensor(getattr(gm, name)) if fake_mode else getattr(gm, name)
    return node


def _key_validity(graph: fx.Graph, padding: tuple, B: int, S: int) -> fx.Node:
    """Nodes taking a per-key factor ([B or 1, 1, 1, S] bool, visible keys or hidden ones; or the
    [B or 1, S] tensor it reads) to the canonical node's ``key_padding`` [B, S] bool (True =
    visible)."""
    factor, hides, source = padding
    if source is not None:
        valid = source if example(source).dtype == torch.bool else emit(graph, "to", (source, torch.bool),
                                                                          op="call_method")
    else:
        valid = emit(graph, "reshape", (factor, (example(factor).shape[0], S)), op="call_method")
        valid.meta[CARRIER] = True
    Bf = example(valid).shape[0]
    if hides:
        valid = emit(graph, operator.invert, (valid,))
    if Bf != B:
        valid = emit(graph, "expand", (valid, B, S), op="call_method")
    return valid


def _table_node(gm: fx.GraphModule, table, like: fx.Node) -> fx.Node | None:
    """The canonical node's ``rel_bias`` [H, 2S − 1]: a buffer for a proved fixed table; for
    learned ones ``embedding(index, W)ᵀ`` per table (W's gradient flows through it), summed."""
    if table is None or isinstance(table, torch.Tensor):
        return None if table is None else _slopes_node(gm, table, like, "rel_bias")
    parts = []
    for learned in table.learned:
        index = _slopes_node(gm, learned.index, like, "rel_bias_index")            # [2S - 1] int64
        part = emit(gm.graph, "t", (emit(gm.graph, F.embedding, (index, learned.weight)),), op="call_method")
        if example(part).dtype != learned.dtype:
            part = emit(gm.graph, "to", (part, learned.dtype), op="call_method")
        parts.append(part)
    if table.fixed is not None:
        parts.append(_slopes_node(gm, table.fixed, like, "rel_bias"))
    node = parts[0]
    for part in parts[1:]:
        node = emit(gm.graph, operator.add, (node, part))
    return node


def _canonical_node(gm, proof: _Proof) -> fx.Node:
    """Emit the canonical node of ``proof`` (operands already [B, H, S, D]) at the insertion point."""
    q, k, v = proof.q, proof.k, proof.v
    B, _, S, _ = example(q).shape
    padding = None if proof.padding is None else _key_validity(gm.graph, proof.padding, B, S)
    slopes = None if proof.slopes is None else _slopes_node(gm, proof.slopes, q)
    table = _table_node(gm, proof.table, q)
    args = (q, k, v, proof.spec.encode(), proof.doc, padding, slopes, table)
    while args[-1] is None and len(args) > 4:            # graphs without per-token data read as before
        args = args[:-1]
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
    if isinstance(found, str):
        node.meta[UNPROVED] = found
        return False
    with gm.graph.inserting_before(node):
        if found is not None:
            sf, vf, (spec, doc, padding, slopes, table) = found
            q = to_bhsd(gm.graph, sf.q, sf.q_perm, sf.q_shape)
            k = sf.k if sf.k_perm is not None or sf.k_shape is not None else unrepeat_kv(sf.k)
            k = to_bhsd(gm.graph, k, sf.k_perm, sf.k_shape)
            v = vf.v if vf.v_perm is not None or vf.v_shape is not None else unrepeat_kv(vf.v)
            v = to_bhsd(gm.graph, v, vf.v_perm, vf.v_shape)
            _check_operands(q, k, v)
            new = _canonical_node(gm, _Proof(q, k, v, spec, doc, padding, slopes, table))
            if vf.out_perm is not None:
                new = emit(gm.graph, "permute", (new, vf.out_perm), op="call_method")
        else:
            proof = _match_sdpa(node, gm, values, static_inputs)
            if isinstance(proof, str):
                node.meta[UNPROVED] = proof
            if proof is None or isinstance(proof, str):
                return False
            _check_operands(proof.q, proof.k, proof.v)
            new = _canonical_node(gm, proof)
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
    if count:
        # what only the replaced attention read (the S×S scores, a copy of them a library keeps as an
        # unused intermediate) would otherwise be sharded by the rewrite, and fall back
        eliminate_dead_code(gm.graph)
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
