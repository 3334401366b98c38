"""Attention masks across frames: built in one frame, proved there, used in another.

The frame that builds a mask proves it from the ops that made it (``passes/mask_proof``) and
hands it out as a ``ProvedMask`` (``runtime/proved_mask.py``): facts plus the per-token data
(document ids, key validity), never an S×S tensor the next frame would have to re-prove. The
frame that receives one rebuilds it in its own graph from index ranges (and the per-token data),
in the very form ``mask_proof`` recognises, so its attention is proved as if the mask had been
built there.

  producer (``carry_mask_outputs``)   output mask node ──proof──▶ facts; the output becomes the
                                      doc-id and key-validity nodes (or nothing); the S×S nodes
                                      die unused
  glue (``wrap_mask_frame``)          outputs: facts + per-token data ──▶ ProvedMask (tokens);
                                      inputs:  ProvedMask ──▶ its tokens (the graph's placeholder)
  consumer (``expand_mask_inputs``)   placeholder (tokens) ──▶ arange / compare / gather nodes
                                      ──▶ the mask's former users

Every proved output is checked once at compile time: the rebuilt mask (per-token factors
all-visible, as the proof evaluates them) must equal the value the proof evaluated, element for
element.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .passes.alias_sets import eliminate_dead_code
from .passes.mask_proof import band_of, evaluate_mask_term, example, is_hidden_value
from .runtime.proved_mask import MaskFacts, ProvedMask, materialize, token_rows
from .runtime.sequence_shard import SequenceShard, full_tensor

__all__ = ["MaskExit", "carry_mask_outputs", "expand_mask_inputs", "wrap_mask_frame", "mask_examples"]


@dataclass(frozen=True)
class MaskExit:
    """One proved mask output: its facts and the builder's shape, strides, dtype and device."""

    facts: MaskFacts
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device


def _prove(node: fx.Node, gm, values, static):
    """(facts, doc node or None, key-padding factor (node, hides) or None) of a graph value that is
    provably a self-attention mask, else None."""
    ex = example(node)
    if (not isinstance(ex, torch.Tensor) or isinstance(ex, (SequenceShard, ProvedMask)) or not 2 <= ex.dim() <= 4
            or ex.requires_grad or ex.shape[-1] != ex.shape[-2] or ex.shape[-1] < 2
            or not (ex.dtype == torch.bool or ex.is_floating_point())):
        return None
    S = int(ex.shape[-1])
    for negated in ((False, True) if ex.dtype == torch.bool else (False,)):
        try:
            term = evaluate_mask_term(node, gm, values, static, negated, at=_output(gm))
        except Exception:  # noqa: BLE001 - a mask we cannot evaluate proves nothing
            term = None
        if term is None:
            continue
        m, doc = term.value, term.doc
        padding = (None if term.key_padding is None
                   else (term.key_padding, term.key_padding_hides, term.key_source))
        fill = 0.0
        if m.dtype == torch.bool:
            visible, encoding = (~m if negated else m), ("hidden" if negated else "visible")
        else:
            hidden = is_hidden_value(m)
            if not bool(((m == 0) | hidden).all()):
                continue
            fills = torch.unique(m[hidden])
            if fills.numel() > 1:
                continue
            visible, encoding = m == 0, "additive"
            fill = float(fills[0]) if fills.numel() else float(torch.finfo(m.dtype).min)
        band = band_of(torch.broadcast_to(visible, ex.shape), S)
        if band is None:
            continue
        if (doc is not None or padding is not None) and ex.dim() != 4:
            continue
        if doc is not None and (example(doc) is None or example(doc).shape[-1] != S
                                or example(doc).is_floating_point()):
            continue
        spec = band.with_(docs=doc is not None, key_padding=padding is not None)
        # the rebuilt value (per-token factors all-visible, as the proof evaluated them) is the proved value
        rebuilt = materialize(MaskFacts(S, band, encoding, fill), torch.empty(0, dtype=torch.long), ex.shape,
                              ex.stride(), ex.dtype)
        if not torch.equal(rebuilt, torch.broadcast_to(m.to(ex.dtype), ex.shape).cpu()):
            continue
        return MaskFacts(S, spec, encoding, fill), doc, padding
    return None


def _output(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "output")


def _validity_node(gm: fx.GraphModule, padding: tuple, B: int, S: int) -> fx.Node:
    """The key validity [B, S] bool (True = visible) of a per-key factor, emitted before the output."""
    from .passes.attention_patterns import _key_validity
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        return _key_validity(gm.graph, padding, B, S)


def carry_mask_outputs(gm: fx.GraphModule, example_inputs: Sequence[Any], static: set) -> list | None:
    """Turn the frame's proved mask outputs into facts: the output becomes its per-token data
    (document ids, then key validity, each [B, S]; or nothing), and the returned layout (per
    original output: None for a plain output, a ``MaskExit`` for a mask) tells
    ``wrap_mask_frame`` how to rebuild the outputs. None when the frame returns no provable mask
    (the graph is untouched)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    results = out.args[0]
    if not isinstance(results, (tuple, list)):
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs))
    layout, kept = [], []
    for r in results:
        proved = _prove(r, gm, values, static) if isinstance(r, fx.Node) else None
        if proved is None:
            layout.append(None)
            kept.append(r)
            continue
        facts, doc, padding = proved
        ex = example(r)
        layout.append(MaskExit(facts, tuple(ex.shape), tuple(ex.stride()), ex.dtype, ex.device))
        if doc is not None:
            kept.append(doc)
        if padding is not None:
            kept.append(_validity_node(gm, padding, int(ex.shape[0]), facts.S))
    if all(e is None for e in layout):
        return None
    out.args = (type(results)(kept),)
    eliminate_dead_code(gm.graph)
    gm.recompile()
    return layout


def wrap_mask_frame(fn: Callable, layout: list | None, mask_inputs: Sequence[int]) -> Callable:
    """The frame at run time: ProvedMask inputs passed as their tokens, mask outputs rebuilt as
    ProvedMasks from the facts and the per-token data the graph returns."""
    if not layout and not mask_inputs:
        return fn

    def run(*args):
        if mask_inputs:
            args = list(args)
            for i in mask_inputs:
                args[i] = args[i].tokens
        outs = fn(*args)
        if not layout:
            return outs
        it, result = iter(outs), []
        for entry in layout:
            if entry is None:
                result.append(next(it))
                continue
            rows = []
            for _ in token_rows(entry.facts.spec):
                x = next(it)
                if isinstance(x, SequenceShard):          # a sharded frame's [B, S] per-token data: small
                    x = full_tensor(x)
                rows.append(x.detach().to(torch.long))
            tokens = torch.stack(rows) if rows else torch.empty(0, dtype=torch.long, device=entry.device)
            result.append(ProvedMask(tokens, entry.facts, entry.shape, entry.stride, entry.dtype))
        return tuple(result) if isinstance(outs, tuple) else result
    return run


def expand_mask_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[list, list[int]]:
    """Rebuild each ProvedMask input inside the graph (see module doc). Returns the example inputs
    with each mask replaced by its tokens, and the positions of those inputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    positions = [i for i, x in enumerate(example_inputs) if isinstance(x, ProvedMask)]
    if not positions:
        return list(example_inputs), []
    examples = list(example_inputs)
    first_op = next(n for n in gm.graph.nodes if n.op != "placeholder")
    fake_mode = _frame_fake_mode(placeholders)
    for i in positions:
        node, mask = placeholders[i], example_inputs[i]
        users = list(node.users)
        node.meta["example_value"] = (fake_mode.from_tensor(mask.tokens, static_shapes=True) if fake_mode
                                      else mask.tokens)
        examples[i] = mask.tokens
        with gm.graph.inserting_before(first_op):
            value = _rebuild(gm.graph, node, mask, fake_mode)
        for u in users:
            u.replace_input_with(node, value)
    gm.graph.lint()
    gm.recompile()
    return examples, positions


def _frame_fake_mode(placeholders):
    """The fake mode the frame's example values live in: the one of its plain fake placeholder
    examples (the attention passes compute new values in it), else the tracing context's."""
    from torch._guards import TracingContext
    from torch._subclasses.fake_tensor import FakeTensor
    for n in placeholders:
        ex = n.meta.get("example_value")
        if isinstance(ex, FakeTensor):
            return ex.fake_mode
    ctx = TracingContext.try_get()
    return ctx.fake_mode if ctx is not None else None


def _rebuild(graph: fx.Graph, tokens: fx.Node, mask: ProvedMask, fake_mode) -> fx.Node:
    """Nodes computing the mask from index ranges and ``tokens``, in mask_proof's recognised form:
    ``X[b, q] == X[b, kv]`` with b, q, kv aranges viewed over [B, H, S, S] for documents, a
    [B, 1, 1, S] bool conjunct for key validity."""
    f, shape, dev = mask.facts, tuple(mask.shape), mask.device
    spec, rows = f.spec, token_rows(f.spec)
    made: list[fx.Node] = []

    def call(target, *args, **kwargs):
        kind = "call_method" if isinstance(target, str) else "call_function"
        n = graph.create_node(kind, target, args, kwargs)
        made.append(n)
        return n

    S = f.S
    q = call("view", call(torch.arange, S, device=dev), 1, 1, S, 1)
    kv = call("view", call(torch.arange, S, device=dev), 1, 1, 1, S)
    visible = call(torch.ones, (1, 1, S, S), dtype=torch.bool, device=dev)
    if spec.ahead is not None:
        visible = call(operator.and_, visible, call(operator.le, call(operator.sub, kv, q), spec.ahead))
    if spec.behind is not None:
        visible = call(operator.and_, visible, call(operator.le, call(operator.sub, q, kv), spec.behind))
    B = int(mask.tokens.shape[1]) if rows else 1
    if spec.docs:
        docs = call(operator.getitem, tokens, rows["docs"])
        b = call("view", call(torch.arange, B, device=dev), B, 1, 1, 1)
        same = call(operator.eq, call(operator.getitem, docs, (b, q)), call(operator.getitem, docs, (b, kv)))
        visible = call(operator.and_, same, visible)
    if spec.key_padding:
        valid = call("view", call("bool", call(operator.getitem, tokens, rows["key_padding"])), B, 1, 1, S)
        visible = call(operator.and_, visible, valid)
    if len(shape) < 4:                              # an [S, S] or [B, S, S] mask (no per-token data then)
        visible = call("view", visible, *(1,) * (len(shape) - 2), S, S)
    value = call("expand", visible, *shape)
    if f.encoding == "hidden":
        value = call(operator.invert, value)
    elif f.encoding == "additive":
        value = call("to", call(torch.where, value, 0.0, f.fill), mask.dtype)
    _fill_examples(made, fake_mode)
    return value


def _fill_examples(nodes: list[fx.Node], fake_mode) -> None:
    """``example_value`` of new nodes, computed on their inputs' examples in the frame's fake mode
    (the passes read shapes and dtypes from it)."""
    import contextlib
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        for n in nodes:
            args = fx.node.map_arg(n.args, lambda a: a.meta["example_value"])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: a.meta["example_value"])
            n.meta["example_value"] = (getattr(args[0], n.target)(*args[1:], **kwargs) if n.op == "call_method"
                                       else n.target(*args, **kwargs))


def mask_examples(examples: list, positions: Sequence[int]) -> list:
    """The inner compiler's examples: each rebuilt mask's tokens as a static fake tensor."""
    from .frames import _static_example
    examples = list(examples)
    for i in positions:
        if isinstance(examples[i], torch.Tensor):
            examples[i] = _static_example(examples[i])
    return examples
