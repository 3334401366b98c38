"""Dynamic shapes: one Dynamo graph, one seqpar specialisation per concrete length.

``torch.compile(model, backend="seqpar", dynamic=True)``, or a model called at a second length
(Dynamo then marks the length dynamic by default), hands the backend a graph whose sizes are
symbols (``s95``, ``s75`` placeholders, ``view(x, s95, s75, H, D)``) and whose float attributes
are 0-d tensor inputs read with ``.item()`` (norm eps, dropout p). seqpar's passes prove masks
by evaluating them and emit sizes as numbers (S/P rows per rank, layout slices), so they need
one length.

The policy (documented, not silent): the backend returns one callable for the symbolic graph,
so Dynamo compiles once and its recompile limit is never reached by lengths; at each call the
callable looks at the concrete sizes, and the first call at a new (batch, length) specialises
the graph to it (symbols and ``.item()`` reads replaced by the call's numbers, example values
recomputed on fake tensors) and compiles that with the ordinary static pipeline; later calls
at the same sizes reuse it. Every specialisation is exact and sharded like a static compile; a
length the schedule cannot split is the usual clear error. Cost: one seqpar compile per
distinct length (bucket lengths in the data loader to bound it); each new one is logged.
"""
from __future__ import annotations

import contextlib
import logging
import operator
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from .passes.alias_sets import eliminate_dead_code

__all__ = ["is_symbolic", "specialise_per_length"]

log = logging.getLogger("seqpar")
_SYM = (torch.SymInt, torch.SymFloat, torch.SymBool)


def is_symbolic(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> bool:
    """True when Dynamo traced ``gm`` with symbolic sizes (a dynamic length)."""
    if any(isinstance(e, _SYM) for e in example_inputs):
        return True
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            ex = node.meta.get("example_value")
            if isinstance(ex, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in ex.shape):
                return True
    return False


def _scalar_placeholders(gm: fx.GraphModule, example_inputs) -> dict[int, str]:
    """Placeholder positions to drop at specialisation: symbolic ints, and 0-d tensors that are
    only read by ``.item()`` (Dynamo's unspecialised float attributes)."""
    drop = {}
    for i, (node, ex) in enumerate(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs)):
        if isinstance(ex, _SYM) or isinstance(ex, (int, float)):
            drop[i] = "value"
        elif (isinstance(ex, torch.Tensor) and ex.dim() == 0 and not ex.requires_grad and node.users
              and all(u.op == "call_method" and u.target == "item" for u in node.users)):
            drop[i] = "item"
    return drop


def _fold(gm: fx.GraphModule) -> None:
    """Evaluate size arithmetic whose inputs became numbers (``16*s95``, ``s75 // 2``)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target.__module__ in ("_operator", "operator", "math") \
                and node.all_input_nodes == [] and node.users:
            value = node.target(*node.args, **node.kwargs)
            if isinstance(value, (int, float, bool)):
                node.replace_all_uses_with(value)
                gm.graph.erase_node(node)


def _specialise(gm: fx.GraphModule, args: Sequence[Any], drop: dict[int, str]) -> fx.GraphModule:
    """A copy of ``gm`` at the sizes of ``args``: dropped placeholders replaced by their values,
    ``node.meta["example_value"]`` recomputed on fake tensors of those sizes."""
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        if drop.get(i) == "value":
            env[node] = args[i] if not isinstance(args[i], _SYM) else int(args[i])
        elif drop.get(i) == "item":
            env[node] = None
            for u in node.users:
                env[u] = args[i].item()
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    for node in gm.graph.nodes:
        if node.op != "placeholder" and node not in env:
            env[node] = graph.node_copy(node, lambda n: env[n])
    out = fx.GraphModule(gm, graph)
    _fold(out)
    eliminate_dead_code(out.graph)
    out.recompile()
    kept = [a for i, a in enumerate(args) if i not in drop]
    _propagate_examples(out, kept)
    return out


def _propagate_examples(gm: fx.GraphModule, args: Sequence[Any]) -> None:
    """``example_value`` of every node at the concrete sizes (fake tensors: nothing computed)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.op != "output":
                n.meta["example_value"] = value
            return value
    with mode:
        _Recorder(gm).run(*fakes)


def _hidden_saved_tensor_hooks():
    """Identity saved-tensor hooks while a new length is specialised and compiled.

    Why: the first call at a new length happens inside the user's training step, so the hooks they
    hold there (``save_on_cpu``, a pack hook that reads values) are active; ``_propagate_examples``
    and the passes run ops with autograd on over fake tensors, whose saves would reach those hooks
    (a hook reading values fails on them). Only the innermost hooks apply, so identity hooks hide
    the user's; the compiled step's own saves, later, still reach them."""
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is None:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_identity, _identity)


def _identity(t):
    return t


_SDPA = (torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_SOFTMAX = (torch.softmax, torch.nn.functional.softmax, torch._C._nn.softmax if hasattr(torch._C._nn, "softmax")
            else torch.softmax, "softmax")


def _attends_a_longer_cache(gm: fx.GraphModule) -> bool:
    """Decoding: queries of a fixed length (one new token) attend keys of a symbolic length (the
    KV cache grown by every step), through SDPA or a hand-written softmax over the keys.

    Such attention is not a self-attention of one length: seqpar would run the graph replicated at
    every length anyway, so specialising it per length would only add one compile per token."""
    found = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _SDPA and len(node.args) >= 2:
            q, k = (a.meta.get("example_value") if isinstance(a, fx.Node) else None for a in node.args[:2])
            if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)):
                continue
            qlen, klen = q.shape[-2], k.shape[-2]
        elif (node.op == "call_function" and node.target in _SOFTMAX) or \
                (node.op == "call_method" and node.target in _SOFTMAX):
            scores = node.meta.get("example_value")
            if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
                continue
            qlen, klen = scores.shape[-2], scores.shape[-1]
        else:
            continue
        if isinstance(qlen, torch.SymInt) or not isinstance(klen, torch.SymInt):
            return False            # a self-attention of one (symbolic) length: specialise and shard it
        found = True
    return found


_decode_warned: list[bool] = []


def _replicated_decode(gm: fx.GraphModule) -> Callable:
    """The symbolic graph itself, run as it is (eager ops, every rank the whole cache) for every
    cache length: one Dynamo compile, no seqpar compile per token; said once per process."""
    import torch.distributed as dist
    if not _decode_warned and (not dist.is_initialized() or dist.get_rank() == 0):
        _decode_warned.append(True)
        warnings.warn("seqpar: decoding (queries of a fixed length attending a KV cache whose length grows every "
                      "step) is not a self-attention of one length: those steps run replicated on every rank, "
                      "uncompiled, for every cache length (no compile per token). seqpar shards training, "
                      "evaluation and prefill", stacklevel=3)
    log.info("seqpar: dynamic shapes: a decode graph (fixed query length, symbolic key length) runs replicated "
             "as traced, for every length")
    return gm.forward


def specialise_per_length(gm: fx.GraphModule, example_inputs: Sequence[Any],
                          compile_static: Callable[[fx.GraphModule, list], Callable]) -> Callable:
    """The callable Dynamo gets for a symbolic graph: it compiles ``gm`` once per concrete
    input sizes with ``compile_static`` (the ordinary seqpar pipeline) and runs that. A decode
    graph that takes no ``SequenceShard`` runs replicated as traced instead (``_replicated_decode``)."""
    from .runtime.sequence_shard import SequenceShard
    if _attends_a_longer_cache(gm) and not any(isinstance(a, SequenceShard) for a in example_inputs):
        return _replicated_decode(gm)
    drop = _scalar_placeholders(gm, example_inputs)
    compiled: dict[tuple, Callable] = {}

    def key_of(args) -> tuple:
        return tuple(a.item() if drop.get(i) == "item" else tuple(a.shape) if isinstance(a, torch.Tensor) else a
                     for i, a in enumerate(args) if isinstance(a, torch.Tensor) or i in drop)

    def run(*args):
        key = key_of(args)
        fn = compiled.get(key)
        if fn is None:
            log.info("seqpar: dynamic shapes: specialising the graph to sizes %s (%d so far)", key, len(compiled) + 1)
            # this runs inside the user's step, under any saved-tensor hooks they hold
            with _hidden_saved_tensor_hooks():
                static = _specialise(gm, args, drop)
                fn = compiled[key] = compile_static(static, [a for i, a in enumerate(args) if i not in drop])
        return fn(*[a for i, a in enumerate(args) if i not in drop])
    run._seqpar_specialisations = compiled       # for tests: how many lengths were compiled
    return run
