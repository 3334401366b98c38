"""The ``seqpar`` torch.compile backend.

Stage diagram (DESIGN §2). Each stage is one module; a graph with no self-attention, or a
world of one rank, skips the sharding stages (warned / logged once).

```
Dynamo FX graph (torch-level, one per frame)
  │ groups + inputs : resolve the sequence-parallel group (default group, SEQPAR_DEGREE, group=)
  │                   and check every rank passes the same batch (input_check.py, SEQPAR_CHECK_INPUTS)
  │ canonicalize    : hand-written attention and masked SDPA → one attention node, masks proved
  │                   to be causal / window / documents (passes/attention_patterns.py, canonicalize.py)
  │ seq-dims +      : Shard(dim, merged factors) / Replicate per node, found while walking the
  │ placements        graph from the inputs (passes/placement.py, sharding_rules.py)
  │ rewrite         : entry shards, ring attention, reductions → all-reduce, parameter-gradient
  │                   sums, exit gathers, gather fallbacks (passes/rewrite.py, attention_rules.py)
  ▼
aot_autograd (joint fw/bw) ── partitioner
  ▼
compile_fx (inductor), or aot_eager with SEQPAR_INNER=aot_eager
```
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .input_check import check_same_inputs
from .options import resolve_options

__all__ = ["backend", "seqpar_backend", "sequence_group"]

log = logging.getLogger("seqpar")

_logged_once: set[str] = set()
_degree_groups: dict[tuple[int, int], dist.ProcessGroup] = {}


def _log_once(key: str, message: str) -> None:
    if key not in _logged_once:
        _logged_once.add(key)
        log.warning(message)


def sequence_group(degree: int | None = None) -> dist.ProcessGroup | None:
    """The sequence-parallel group of this rank: the whole default group, or with ``degree``
    the consecutive block of ``degree`` ranks this rank belongs to. None without a process group.

    Every rank must call this (``new_subgroups``-style creation is collective), which the
    backend does on every rank at the first compile.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if degree is None or degree == world:
        return dist.group.WORLD
    if world % degree:
        raise ValueError(f"SEQPAR_DEGREE={degree} must divide the world size {world} "
                         f"(allowed: the divisors of {world})")
    key = (world, degree)
    if key not in _degree_groups:
        mine = None
        for start in range(0, world, degree):
            group = dist.new_group(list(range(start, start + degree)))
            if start <= dist.get_rank() < start + degree:
                mine = group
        _degree_groups[key] = mine
    return _degree_groups[key]


def _inner_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], inner: str) -> Callable:
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs)


def backend(*, group: dist.ProcessGroup | None = None, **options: Any) -> Callable:
    """A backend callable with explicit options (lower-case names; they override ``SEQPAR_*``).

    ``torch.compile(model, backend=seqpar_compiler.backend(schedule="zigzag", group=pg))``.
    """
    opts = resolve_options(**options)

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        pg = group if group is not None else sequence_group(opts["degree"])
        P = 1 if pg is None else dist.get_world_size(pg)
        if P == 1:
            _log_once("single", "seqpar: no process group or a group of one rank: compiling with "
                                f"{opts['inner']} only (nothing to shard)")
            return _inner_compile(gm, example_inputs, opts["inner"])
        sharded = _shard_graph(gm, example_inputs, pg, opts)
        compiled = _inner_compile(sharded if sharded is not None else gm, example_inputs, opts["inner"])
        if not opts["check_inputs"]:
            return compiled

        def run(*args):
            check_same_inputs(args, pg)
            return compiled(*args)
        return run

    return compile_graph


def _is_model_state(node: torch.fx.Node, value) -> bool:
    """A parameter or buffer lifted into the graph by Dynamo (not the user's batch)."""
    name = str(node.target)
    return isinstance(value, torch.nn.Parameter) or "_parameters_" in name or "_buffers_" in name


def _user_input_dims(gm: torch.fx.GraphModule, example_inputs, S: int) -> dict[str, int]:
    """Placeholders that are the user's inputs (not parameters or buffers) with a sequence dim."""
    dims = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.Tensor) or _is_model_state(node, value):
            continue
        shape = tuple(value.shape)
        if len(shape) >= 2 and shape[1] == S:
            dims[node.name] = 1
        elif shape.count(S) == 1:
            dims[node.name] = shape.index(S)
    return dims


def _shard_graph(gm, example_inputs, pg, opts) -> torch.fx.GraphModule | None:
    """The sequence-parallel graph, or None when the graph has nothing to shard."""
    from seqpar_compiler.passes.attention_patterns import canonicalize_handwritten_attention
    from seqpar_compiler.passes.canonicalize import find_attention, sequence_length
    from seqpar_compiler.passes.rewrite import ShardingContext, rewrite_graph
    from seqpar_compiler.runtime import check_sequence_length
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    static = {n for n, value in zip(placeholders, example_inputs) if _is_model_state(n, value)}
    canonicalize_handwritten_attention(gm, example_inputs, static)
    attention = find_attention(gm)
    S = sequence_length(attention)
    P = dist.get_world_size(pg)
    if not attention or S is None:
        warnings.warn(f"seqpar: this graph has {'no' if not attention else 'no common-length'} self-attention; "
                      f"it runs replicated on each of the {P} ranks", stacklevel=3)
        return None
    check_sequence_length(S, opts["schedule"], P, what="the model's sequence length")
    ctx = ShardingContext(S=S, P=P, rank=dist.get_rank(pg), schedule=opts["schedule"],
                          group_name=pg.group_name, fallback=opts["fallback"], output=opts["output"],
                          kernel=opts["kernel"], overlap=opts["overlap"], grad_reduce=opts["grad_reduce"])
    out = rewrite_graph(gm, example_inputs, ctx, _user_input_dims(gm, example_inputs, S))
    log.info("seqpar: sharded a graph over %d ranks (S=%d, schedule %s): %d fallbacks, collectives: %s",
             P, S, opts["schedule"], len(ctx.fallbacks), ", ".join(ctx.collectives))
    return out


def seqpar_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """``backend="seqpar"``: options from the ``SEQPAR_*`` environment at compile time."""
    return backend()(gm, example_inputs)
