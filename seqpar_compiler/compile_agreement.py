"""Every rank of a sequence group compiles a frame sharded, or every rank runs it replicated.

Why: the ranks of a group each compile the same Dynamo graph, and a seqpar pass (or the inner
compile of the rewritten graph) that raises must not crash a model plain ``torch.compile`` runs.
Falling back alone is not enough: a rank that falls back to the replicated graph while another
shards waits forever in a collective the other never joins. So the ranks decide together:

  * the sharded compile runs inside a window; every rank ends it with one agreement collective
    (an all-gather of one status number per rank, on the group's device, with the group's
    timeout): ``OK``, ``FAILED`` (an internal error: a seqpar bug) or ``REFUSED`` (a deliberate
    error said to the user: ``SEQPAR_FALLBACK=error``, attention dropout, a length no schedule
    splits);
  * all ``OK``: the sharded frame. Any ``REFUSED``: every rank raises (the refusing ranks their
    own error, the others ``SeqparCompileError`` naming them). Any ``FAILED``: every rank compiles
    the original Dynamo graph with the inner compiler alone (replicated: exact, no memory saved),
    and the group's rank 0 warns once with the stage, the exception's first line and "please
    report"; under ``SEQPAR_FALLBACK=error`` every rank raises instead;
  * a collective inside the window (``SCHEDULE=auto``'s broadcast, the calibration) is preceded by
    ``agreement_checkpoint()``, the same collective: a rank that failed before it answers it with
    its final status, so the ranks never run different collectives against each other.

What is covered: every stage of the backend's diagram from the frame edges on (mask and shard
glue, canonicalize, placements and rewrite, blockwise FFN, the partitioner, the inner compile of
the forward *and the backward*: aot_autograd compiles the backward lazily, at the first
``backward()``, where no rank could fall back any more, so the window sets
``force_non_lazy_backward_lowering`` and the backward is compiled with the forward). Not covered:
errors at run time (the first call, the ring itself), Dynamo's guard building after the backend
returns, and the group resolution and length dispatch before the window (each per-length compile
is a window of its own).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx

from .runtime.control import control_all_gather, control_broadcast_object

__all__ = ["SeqparCompileError", "agreement_checkpoint", "compile_in_agreement", "compile_replicated", "faulting",
           "in_window", "refusal", "stage"]

log = logging.getLogger("seqpar")

OK, FAILED, REFUSED = 0, 1, 2

# Test-only fault injection: stage name -> group ranks on which that stage raises once it has run
# (the graph already changed by it). Read by ``stage`` only; never set outside tests.
_FAULTS: dict[str, set[int]] = {}


class SeqparCompileError(RuntimeError):
    """Compiling a frame failed on some rank of the group and this rank stops too (no hang)."""


class InjectedCompileFailure(RuntimeError):
    """The failure a test injects into one stage (``_FAULTS``)."""


class _PeerFailed(BaseException):
    """Raised on a healthy rank at a checkpoint where a peer reported a failure (a BaseException:
    no ``except Exception`` of a pass between the checkpoint and the window may swallow it)."""


@dataclass
class _Window:
    pg: dist.ProcessGroup
    stage: str = "sharded compile"
    verdict: torch.Tensor | None = None       # [P] statuses, once agreed


_windows: list[_Window] = []


def _status(err: BaseException | None) -> int:
    if err is None:
        return OK
    return REFUSED if getattr(err, "_seqpar_refusal", False) or _is_refusal(err) else FAILED


def _is_refusal(err: BaseException) -> bool:
    """Errors seqpar raises on purpose, to say something to the user: never a fallback."""
    from .passes.rewrite import SeqparFallbackError
    return isinstance(err, SeqparFallbackError) or (isinstance(err, ValueError) and str(err).startswith("seqpar:"))


@contextlib.contextmanager
def refusal(*kinds: type):
    """Errors of ``kinds`` raised inside are deliberate (a check of the user's setup: a length no
    schedule splits), whatever their text: raised on every rank, never a fallback."""
    try:
        yield
    except kinds as err:
        err._seqpar_refusal = True
        raise


@contextlib.contextmanager
def stage(name: str):
    """Marks the stage running now (named in the warning); a test's injected fault fires at its
    end. Outside a window (one rank, no group) it does nothing."""
    w = _windows[-1] if _windows else None
    if w is None:
        yield
        return
    outer, w.stage = w.stage, name
    yield                              # an error inside leaves the innermost stage named
    if dist.get_rank(w.pg) in _FAULTS.get(name, ()):
        raise InjectedCompileFailure(f"injected failure in stage {name!r} (test)")
    w.stage = outer


def in_window() -> bool:
    """Whether a sharded compile of a group is running (its failures are agreed on)."""
    return bool(_windows)


def faulting(fn: Callable, name: str) -> Callable:
    """``fn`` run as stage ``name`` (the partitioner and the backward compile are called by
    aot_autograd, not by the backend)."""
    def run(*args, **kwargs):
        with stage(name):
            return fn(*args, **kwargs)
    return run


def _agree(w: _Window, status: int) -> torch.Tensor:
    if w.verdict is None:
        w.verdict = control_all_gather(torch.tensor([status], dtype=torch.int32), w.pg).flatten()
    return w.verdict


def agreement_checkpoint() -> None:
    """Call before a collective inside the window: every rank agrees that nobody failed so far.
    A rank that failed earlier answers this very collective with its final status; then the
    verdict stands for the whole window and this rank stops compiling."""
    if not _windows:
        return
    w = _windows[-1]
    if bool((_agree(w, OK) != OK).any()):
        raise _PeerFailed()
    w.verdict = None                   # everybody is fine so far: the final agreement is still to come


def _first_line(err: BaseException) -> str:
    """The exception's first line, and its last one when that differs (torch.fx puts the graph
    first and the reason last)."""
    text = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    line = f"{type(err).__name__}: {text[0] if text else ''}"[:300]
    return line + (f" ... {text[-1][-200:]}" if len(text) > 1 else "")


def compile_in_agreement(gm: fx.GraphModule, example_inputs: Sequence[Any], pg: dist.ProcessGroup, opts: dict,
                         compile_sharded: Callable[["Pristine"], Callable], frame: str) -> Callable:
    """``compile_sharded(pristine)`` on every rank, or the replicated frame on every rank (module
    doc). ``pristine`` keeps the Dynamo graph as it was before any pass changes ``gm``."""
    pristine = Pristine(gm)
    w = _Window(pg)
    _windows.append(w)
    err: BaseException | None = None
    try:
        compiled = compile_sharded(pristine)
    except _PeerFailed:
        compiled = None
    except Exception as e:  # noqa: BLE001 - decided on together below
        compiled, err = None, e
    finally:
        _windows.pop()
    verdict = _agree(w, _status(err))
    if bool((verdict == OK).all()):
        return compiled
    bad = [r for r, s in enumerate(verdict.tolist()) if s != OK]
    src = next((r for r, s in enumerate(verdict.tolist()) if s == REFUSED), bad[0])
    what = control_broadcast_object(f"{w.stage}: {_first_line(err)}" if err is not None else "", pg, src=src)
    rank, P = dist.get_rank(pg), dist.get_world_size(pg)
    if err is not None and _status(err) == FAILED:
        log.warning("seqpar: compiling frame %s sequence-parallel failed on this rank (group rank %d) in stage "
                    "%s", frame, rank, w.stage, exc_info=err)
    refused = bool((verdict == REFUSED).any())
    if refused or opts["fallback"] == "error":
        if err is not None:
            raise err
        verb = "refused" if refused else "failed"
        raise SeqparCompileError(f"seqpar: compiling frame {frame} {verb} on group rank(s) {bad} ({what}); this rank "
                                 f"stops too, so that no rank waits for the others")
    if rank == 0:
        warnings.warn(f"seqpar: compiling frame {frame} sequence-parallel failed on group rank(s) {bad} in stage "
                      f"{what}. The frame runs replicated on all {P} ranks instead (exact, no memory saved). This "
                      f"is a seqpar bug: please report it, with the traceback the failing rank logged (logger "
                      f"'seqpar'); SEQPAR_FALLBACK=error raises instead", stacklevel=4)
    return compile_replicated(pristine.module(), example_inputs, opts["inner"])


class Pristine:
    """The Dynamo graph as it came, before any pass: the nodes copied (the passes rewrite the
    graph in place), the module's attributes shared (parameters, buffers, bodies: the passes add
    attributes but never change one). The graph module is built only when asked for (a fallback,
    SEQPAR_VERIFY): building one generates and compiles its code, which would cost every compile."""

    def __init__(self, gm: fx.GraphModule):
        self._root, self._graph, self._module = gm, copy.deepcopy(gm.graph), None
        self._attributes = dict(vars(gm))
        self._meta = dict(getattr(gm, "meta", {}))
        for old, new in zip(gm.graph.nodes, self._graph.nodes):
            if old.op == "placeholder" and hasattr(old, "_dynamo_source"):    # Dynamo's, aot reads it
                new._dynamo_source = old._dynamo_source

    def module(self) -> fx.GraphModule:
        if self._module is None:
            out = fx.GraphModule(self._root, self._graph)
            for name, value in self._attributes.items():     # Dynamo's own attributes
                if name not in vars(out):
                    vars(out)[name] = value
            out.meta = self._meta
            self._module = out
        return self._module


def compile_replicated(gm: fx.GraphModule, example_inputs: Sequence[Any], inner: str) -> Callable:
    """The frame as plain ``torch.compile`` would run it: the inner compiler alone on the
    original graph. Sequence shards arriving from other frames come in whole (an all-gather;
    their gradient goes back as shards) and proved masks as the masks they stand for."""
    from .runtime.proved_mask import ProvedMask
    from .runtime.sequence_shard import SequenceShard, full_tensor
    examples, convert = list(example_inputs), {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, x in enumerate(example_inputs):
        if isinstance(x, (SequenceShard, ProvedMask)):
            convert[i] = type(x)
            examples[i] = _whole_example(x)
            if i < len(placeholders):
                placeholders[i].meta["example_value"] = examples[i]
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager
        compiled = aot_eager(gm, examples)
    else:
        from torch._inductor.compile_fx import compile_fx
        compiled = compile_fx(gm, examples)
    if not convert:
        return compiled

    def run(*args):
        args = list(args)
        for i in convert:
            if isinstance(args[i], SequenceShard):
                args[i] = full_tensor(args[i]).contiguous()
            elif isinstance(args[i], ProvedMask):
                args[i] = args[i].full_tensor()
        return compiled(*args)
    return run


def _whole_example(x: torch.Tensor) -> torch.Tensor:
    """A static fake tensor of the frame's fake mode with ``x``'s global shape (contiguous: the
    gathered value is made contiguous at run time)."""
    from torch._guards import TracingContext
    whole = torch.empty(tuple(x.shape), dtype=x.dtype, device=x.device)
    ctx = TracingContext.try_get()
    if ctx is not None and ctx.fake_mode is not None:
        whole = ctx.fake_mode.from_tensor(whole, static_shapes=True)
    return whole.requires_grad_(x.requires_grad) if x.requires_grad else whole

