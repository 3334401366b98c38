"""Attention masks across frames: built in one frame, proved there, used in another (issue 13).

The frame that builds a mask proves it from the ops that made it (``passes/mask_proof``) and
hands it out as a ``ProvedMask`` (``runtime/proved_mask.py``): facts plus the document ids, never
an S×S tensor the next frame would have to re-prove. The frame that receives one rebuilds it in
its own graph from index ranges (and the document ids), in the very form ``mask_proof``
recognises, so its attention is proved as if the mask had been built there.

  producer (``carry_mask_outputs``)   output mask node ──proof──▶ facts; the output becomes the
                                      doc-id node (or nothing); the S×S nodes die unused
  glue (``wrap_mask_frame``)          outputs: facts + docs ──▶ ProvedMask;
                                      inputs:  ProvedMask ──▶ its docs (the graph's placeholder)
  consumer (``expand_mask_inputs``)   placeholder (docs) ──▶ arange / compare / gather nodes
                                      ──▶ the mask's former users

Every proved output is checked once at compile time: the rebuilt mask (documents all-true, as the
proof evaluates them) must equal the value the proof evaluated, element for element.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .passes.alias_sets import eliminate_dead_code
from .passes.mask_proof import evaluate_mask_term, example, is_hidden_value, mask_kind
from .runtime.proved_mask import MaskFacts, ProvedMask, materialize
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


def _prove(node: fx.Node, gm, values, static) -> tuple[MaskFacts, fx.Node | None] | None:
    """(facts, doc node) of a graph value that is provably a self-attention mask, else None."""
    ex = example(node)
    if (not isinstance(ex, torch.Tensor) or isinstance(ex, (SequenceShard, ProvedMask)) or not 2 <= ex.dim() <= 4
            or ex.requires_grad or ex.shape[-1] != ex.shape[-2] or ex.shape[-1] < 2
            or not (ex.dtype == torch.bool or ex.is_floating_point())):
        return None
    S = int(ex.shape[-1])
    for negated in ((False, True) if ex.dtype == torch.bool else (False,)):
        try:
            found = evaluate_mask_term(node, gm, values, static, negated)
        except Exception:  # noqa: BLE001 - a mask we cannot evaluate proves nothing
            found = None
        if found is None:
            continue
        m, doc = found
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
        kind = mask_kind(torch.broadcast_to(visible, ex.shape), S)
        if kind is None:
            continue
        facts = MaskFacts(S, kind[0], kind[1], doc is not None, encoding, fill)
        if doc is not None and (ex.dim() != 4 or example(doc) is None or example(doc).shape[-1] != S
                                or example(doc).is_floating_point()):
            continue
        # the rebuilt value (documents all-true, as the proof evaluated them) is the proved value
        no_docs = MaskFacts(S, kind[0], kind[1], False, encoding, fill)
        rebuilt = materialize(no_docs, torch.empty(0, dtype=torch.long), ex.shape, ex.stride(), ex.dtype)
        if not torch.equal(rebuilt, torch.broadcast_to(m.to(ex.dtype), ex.shape).cpu()):
            continue
        return facts, doc
    return None


def carry_mask_outputs(gm: fx.GraphModule, example_inputs: Sequence[Any], static: set) -> list | None:
    """Turn the frame's proved mask outputs into facts: the output becomes the document ids (or
    is dropped), and the returned layout (per original output: None for a plain output, a
    ``MaskExit`` for a mask) tells ``wrap_mask_frame`` how to rebuild the outputs. None when the
    frame returns no provable mask (the graph is untouched)."""
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
        facts, doc = proved
        ex = example(r)
        layout.append(MaskExit(facts, tuple(ex.shape), tuple(ex.stride()), ex.dtype, ex.device))
        if doc is not None:
            kept.append(doc)
    if all(e is None for e in layout):
        return None
    out.args = (type(results)(kept),)
    eliminate_dead_code(gm.graph)
    gm.recompile()
    return layout


def wrap_mask_frame(fn: Callable, layout: list | None, mask_inputs: Sequence[int]) -> Callable:
    """The frame at run time: ProvedMask inputs passed as their document ids, mask outputs
    rebuilt as ProvedMasks from the facts and the document ids the graph returns."""
    if not layout and not mask_inputs:
        return fn

    def run(*args):
        if mask_inputs:
            args = list(args)
            for i in mask_inputs:
                args[i] = args[i].docs
        outs = fn(*args)
        if not layout:
            return outs
        it, result = iter(outs), []
        for entry in layout:
            if entry is None:
                result.append(next(it))
                continue
            docs = next(it) if entry.facts.docs else torch.empty(0, dtype=torch.long, device=entry.device)
            if isinstance(docs, SequenceShard):          # a sharded frame's doc ids: [B, S] integers, small
                docs = full_tensor(docs)
            result.append(ProvedMask(docs.detach(), entry.facts, entry.shape, entry.stride, entry.dtype))
        return tuple(result) if isinstance(outs, tuple) else result
    return run


def expand_mask_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[list, list[int]]:
    """Rebuild each ProvedMask input inside the graph (see module doc). Returns the example inputs
    with each mask replaced by its document ids, and the positions of those inputs."""
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
        node.meta["example_value"] = fake_mode.from_tensor(mask.docs, static_shapes=True) if fake_mode else mask.docs
        examples[i] = mask.docs
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


def _rebuild(graph: fx.Graph, docs: fx.Node, mask: ProvedMask, fake_mode) -> fx.Node:
    """Nodes computing the mask from index ranges and ``docs``, in mask_proof's recognised form:
    ``X[b, q] == X[b, kv]`` with b, q, kv aranges viewed over [B, H, S, S]."""
    f, shape, dev = mask.facts, tuple(mask.shape), mask.device
    made: list[fx.Node] = []

    def call(target, *args, **kwargs):
        kind = "call_method" if isinstance(target, str) else "call_function"
        n = graph.create_node(kind, target, args, kwargs)
        made.append(n)
        return n

    S = f.S
    q = call("view", call(torch.arange, S, device=dev), 1, 1, S, 1)
    kv = call("view", call(torch.arange, S, device=dev), 1, 1, 1, S)
    visible = (call(operator.le, kv, q) if f.causal
               else call(torch.ones, (1, 1, S, S), dtype=torch.bool, device=dev))
    if f.window is not None:
        visible = call(operator.and_, visible, call(operator.gt, kv, call(operator.sub, q, f.window)))
    if f.docs:
        B = int(mask.docs.shape[0])
        b = call("view", call(torch.arange, B, device=dev), B, 1, 1, 1)
        same = call(operator.eq, call(operator.getitem, docs, (b, q)), call(operator.getitem, docs, (b, kv)))
        visible = call(operator.and_, same, visible)
    if len(shape) < 4:                              # an [S, S] or [B, S, S] mask (no documents then)
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
    """The inner compiler's examples: each rebuilt mask's document ids as a static fake tensor."""
    from .frames import _static_example
    examples = list(examples)
    for i in positions:
        if isinstance(examples[i], torch.Tensor):
            examples[i] = _static_example(examples[i])
    return examples
