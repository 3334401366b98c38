"""Masks proved by evaluation: which visibility (an ``AttentionSpec``'s band, documents, key
padding) a traced mask is.

Reads Dynamo's ``node.meta["example_value"]``; writes nothing (pure analysis, used by
``attention_patterns`` and the other attention-form recognisers).

A mask whose inputs are all static (positions from ``arange``, buffers; no user data) is
evaluated once, at the global sequence length, and compared with the exact band of positions
it must then be (``band_of``: "no mask", causal, a causal sliding window, a bidirectional local
window). User data is understood only as the per-token factors of ``token_masks`` — a
same-document factor (becomes ``doc_ids``, with shift-invariant comparisons of the position ids
transformers numbers packed documents from), a key-padding factor (becomes ``key_padding``) —
which are evaluated as all-visible and carried as tensors. A mask that depends on the batch in
any other way (a comparison with a constant, a per-query factor) or matches no band proves
nothing, so the graph falls back to the gather path — never treated as causal unless it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.fx as fx

from seqpar_compiler.kernels import AttentionSpec

__all__ = ["is_call", "example", "ancestors", "user_dependent", "evaluate", "band_of", "chunk_documents", "ProvedTerm",
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


def evaluate(gm: fx.GraphModule, node: fx.Node, values: dict, substitute: dict | None = None, at=None):
    """The value of ``node`` computed from its ancestors only (placeholders from ``values``,
    nodes in ``substitute`` replaced by the given values), as node ``at`` reads it (default
    ``node`` itself): with the in-place writes into it that come before ``at``."""
    substitute = substitute or {}
    needed = set(ancestors(node, frozenset(substitute))) | set(substitute)
    needed |= _writes_before(gm, node if at is None else at, needed, frozenset(substitute))
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


def _writes_before(gm: fx.GraphModule, node: fx.Node, needed: set, stop: frozenset) -> set:
    """The in-place writes before ``node`` into the storage of a needed value (``mask[i, :j] =
    False`` in a Python loop, ``mask.masked_fill_(...)``), with their own inputs: FX edges do not
    order a write before a later read of the tensor it wrote, so the ancestors alone would read
    the value before its writes. Storage identity of the (fake) example values is the alias
    relation (``alias_sets``), so writes through a view count too."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from .alias_sets import written_inputs

    def key(n):
        ex = n.meta.get("example_value") if isinstance(n, fx.Node) else None
        try:
            return StorageWeakRef(ex.untyped_storage()) if isinstance(ex, torch.Tensor) else None
        except Exception:  # noqa: BLE001 - a tensor without storage has no aliases
            return None
    extra: set = set()
    while True:
        keys = {k for k in map(key, needed | extra) if k is not None}
        found = set()
        for n in gm.graph.nodes:
            if n is node:
                break
            if n not in needed and n not in extra and any(key(t) in keys for t in written_inputs(n)):
                found |= set(ancestors(n, stop))
        if found <= extra:
            return extra
        extra |= found


def band_of(visible: torch.Tensor, S: int) -> AttentionSpec | None:
    """The band ``-behind <= kv - q <= ahead`` that ``visible`` [.., S, S] is exactly (the same
    for every leading index), as an ``AttentionSpec`` with only ``behind``/``ahead`` set (None:
    unbounded); None if it is no band or a query sees no key (every band here holds the
    diagonal, so no row is empty: a row with no key has no single meaning across encodings)."""
    flat = visible.reshape(-1, S, S)
    if not bool((flat == flat[:1]).all()):
        return None
    vis = flat[0].cpu()
    if bool(vis.all()):
        return AttentionSpec()
    if not bool(vis.any(-1).all()):
        return None
    i = torch.arange(S)
    first = vis.to(torch.int8).argmax(-1)
    last = S - 1 - vis.flip(-1).to(torch.int8).argmax(-1)
    ahead, behind = int((last - i).max()), int((i - first).max())
    band = AttentionSpec(behind=None if behind >= S - 1 else behind, ahead=None if ahead >= S - 1 else ahead)
    return band if torch.equal(vis, _band(S, band.behind, band.ahead)) else None


def chunk_documents(visible: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Chunked attention (Llama 4's ``attention_chunk_size``) as documents: when ``visible``
    [.., S, S] (the same for every leading index) is a causal or bidirectional band restricted
    to consecutive chunks of c positions, (the band's visibility [S, S], chunk ids [S] =
    position // c); None otherwise. The chunks are documents whose ids are derived from the
    positions, so the ring carries them as ``doc_ids``."""
    flat = visible.reshape(-1, S, S)
    if not bool((flat == flat[:1]).all()):
        return None
    vis = flat[0].cpu()
    i = torch.arange(1, S)
    boundary = ~vis[i, i - 1] & ~vis[i - 1, i]        # position i starts a chunk: it and i-1 never meet
    if not bool(boundary.any()):
        return None
    c = int(boundary.to(torch.int8).argmax()) + 1
    ids = torch.arange(S) // c
    same = ids[:, None] == ids[None, :]
    for band in (_band(S, None, 0), _band(S, None, None)):
        if torch.equal(vis, band & same):
            return band, ids
    return None


@lru_cache(maxsize=16)
def _band(S: int, behind: int | None, ahead: int | None) -> torch.Tensor:
    """The [S, S] visibility of a band, built once per (S, band): every layer of a model proves
    against the same one (compile time stays linear in the layers)."""
    d = torch.arange(S)[None, :] - torch.arange(S)[:, None]           # kv - q
    vis = torch.ones(S, S, dtype=torch.bool)
    if ahead is not None:
        vis &= d <= ahead
    if behind is not None:
        vis &= -d <= behind
    return vis


@dataclass
class ProvedTerm:
    """A mask or score term proved by ``evaluate_mask_term``.

    ``value``: the term evaluated at the global length with its per-token factors as
    all-visible; ``doc``: the [B, S] document-id node, or None; ``key_padding``: the per-key
    factor node ([B or 1, 1, 1, S] bool), or None, marking visible keys (hidden ones when
    ``key_padding_hides``); ``key_source``: the [B or 1, S] tensor that factor reads, or None
    (``token_masks.key_source``); ``finite_fill``: a factor was hidden by a finite fill (``finfo.min``)
    on its way, so where it hides every key of a query, eager attention averages all values
    instead of giving 0."""

    value: torch.Tensor
    doc: fx.Node | None = None
    key_padding: fx.Node | None = None
    key_padding_hides: bool = False
    key_source: fx.Node | None = None
    finite_fill: bool = False


def evaluate_mask_term(mask, gm, values, static_inputs, negated: bool = False, at=None) -> ProvedTerm | None:
    """The ``ProvedTerm`` of a mask or score term whose value depends on no user input except
    through the per-token factors of ``token_masks`` (documents only where visibility is a
    conjunction, so not ``negated``); None otherwise. ``at``: the node that reads the term (its
    in-place writes up to there count: a mask filled row by row in a loop)."""
    from .token_masks import document_factor, key_source, packed_position_terms, padding_factor
    if not isinstance(mask, fx.Node):
        return None
    term = ProvedTerm(value=None)
    substitute = {}

    def dependent():
        return user_dependent(mask, static_inputs, frozenset(substitute))
    if dependent():
        found = None if negated else document_factor(mask, gm, values, static_inputs)
        if found is not None:
            eq, term.doc, fill = found
            term.finite_fill |= fill is not None
            substitute[eq] = torch.ones(example(eq).shape, dtype=torch.bool, device=example(eq).device)
        if dependent():
            found = padding_factor(mask, static_inputs, negated, frozenset(substitute))
            if found is not None:
                term.key_padding, fill = found
                term.key_padding_hides = negated
                term.key_source = key_source(term.key_padding, gm, values, static_inputs)
                term.finite_fill |= fill is not None
                ex = example(term.key_padding)
                fill_value = torch.zeros if negated else torch.ones
                substitute[term.key_padding] = fill_value(ex.shape, dtype=torch.bool, device=ex.device)
        if dependent() and term.doc is not None:
            positions = packed_position_terms(mask, eq, term.doc, gm, values, static_inputs)
            if positions is None:
                return None
            substitute.update(positions)
        if dependent():
            return None
    term.value = evaluate(gm, mask, values, substitute, at=at)
    return term


def is_hidden_value(m: torch.Tensor) -> torch.Tensor:
    """Where a float score term hides its key: -inf or at most half the dtype's lowest value
    (``finfo.min`` and ``-finfo.max`` masks: exp() of them is exactly 0 next to any real score)."""
    return m <= torch.finfo(m.dtype).min / 2


def static_mask_kind(mask, gm, values, static_inputs, shape, S, negated: bool = False, at=None):
    """(band ``AttentionSpec``, doc_ids node or None) of a mask tensor without key padding
    (bool: True = visible, or True = hidden with ``negated``; float: 0 / very negative), proved
    by ``evaluate_mask_term``."""
    term = evaluate_mask_term(mask, gm, values, static_inputs, negated, at=at)
    if term is None or term.key_padding is not None:
        return None
    m = term.value
    if m.dtype == torch.bool:
        visible = ~m if negated else m
    elif m.is_floating_point() and bool(((m == 0) | is_hidden_value(m)).all()):
        visible = m == 0
    else:
        return None
    band = band_of(torch.broadcast_to(visible, shape), S)
    return None if band is None else (band, term.doc)
