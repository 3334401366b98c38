"""The ``seqpar`` torch.compile backend.

Stage diagram (DESIGN §2). Stages marked (planned) are not built yet; until they are, a graph
on a group of more than one rank runs *replicated* (every rank computes the whole sequence:
correct, not sequence-parallel) with a warning, or raises with ``SEQPAR_FALLBACK=error``.

```
Dynamo FX graph (torch-level, one per frame)
  │ groups + inputs : resolve the sequence-parallel group (default group, SEQPAR_DEGREE, group=)
  │                   and check every rank passes the same batch (SEQPAR_CHECK_INPUTS)
  │ canonicalize    : SDPA / hand-written attention → one attention node           (planned)
  │ seq-dims        : the sequence dim of every tensor                              (planned)
  │ placements      : Shard(seq) / Replicate / Partial per node                     (planned)
  │ rewrite         : entry shards, ring attention, reductions, exit gathers        (planned)
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
        message = (f"seqpar: the sharding passes are not built yet, so this graph runs replicated on "
                   f"each of the {P} ranks (correct, not sequence-parallel)")
        if opts["fallback"] == "error":
            raise NotImplementedError(message + "; SEQPAR_FALLBACK=error forbids the fallback")
        warnings.warn(message, stacklevel=2)
        compiled = _inner_compile(gm, example_inputs, opts["inner"])
        if not opts["check_inputs"]:
            return compiled

        def run(*args):
            check_same_inputs(args, pg)
            return compiled(*args)
        return run

    return compile_graph


def seqpar_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """``backend="seqpar"``: options from the ``SEQPAR_*`` environment at compile time."""
    return backend()(gm, example_inputs)
