"""``SEQPAR_VERIFY``: a sharded frame checked against the same frame run replicated.

``first`` checks the first call of each compiled frame, ``always`` every call, ``off`` (the
default) none. A checked call runs the sharded frame as usual and then the original Dynamo graph
eagerly on the same inputs (whole, on every rank; the RNG state before the call replayed, the
state after the sharded run restored), and compares in float64 norms, ``||out - ref|| / ||ref||``:

  * every output (sequence shards gathered), against ``TOLERANCES[dtype][0]``;
  * the gradients of the frame's inputs that require grad (its parameters first), for one
    random cotangent per output drawn alike on every rank, through both runs with
    ``torch.autograd.grad`` (nothing is accumulated into ``.grad``), against ``[1]``.

The errors are all-reduced (MAX) so every rank decides alike. A forward mismatch then runs both
graphs node by node (the rewritten graph records, in ``seqpar_node_map``, which of its nodes holds
each original node's value and where the sequence is in it), gathers each sharded value by its
placement and raises ``SeqparParityError`` naming the first original node that differs (``.node``);
a gradient mismatch names the input (``.parameter``: the module path of a parameter).

Cost of a checked call: a replicated forward and backward of the whole frame on every rank (the
whole sequence: the memory the sharding saves is spent once more), the outputs and input
gradients gathered whole, one more backward of the sharded frame, and after a mismatch a second
node-by-node run of both graphs that keeps every value. Not checked: frames that draw random
numbers (dropout p > 0: a sharded run's masks are not a replicated run's), frames that run
replicated anyway; under ``GRAD_REDUCE=none`` parameter gradients are summed over the group first
and activation gradients are not compared.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.fx as fx

from .passes.placement import Replicate, SeqRange, Shard
from .runtime.control import control_all_reduce_max
from .runtime.proved_mask import ProvedMask
from .runtime.sequence_shard import SequenceShard, ShardSpec, from_local, full_tensor, gather_local

__all__ = ["SeqparParityError", "TOLERANCES", "checked_calls", "verifying"]

# (outputs and node values, gradients) by the lowest precision the frame computes in: fp32 as the
# README's exactness tests; bf16 as the suite's autocast tests (docs/debugging.md: a ring
# adds attention blocks in another order, and bf16 rounds each block); fp16 from its 8x finer roundoff
TOLERANCES = {torch.float64: (1e-9, 1e-8), torch.float32: (1e-5, 1e-4), torch.bfloat16: (5e-2, 1e-1),
              torch.float16: (1e-2, 5e-2)}
_COTANGENT_SEED = 20240917


_checked = [0]         # calls compared so far in this process


def checked_calls() -> int:
    """How many calls of sharded frames this process has compared with a replicated run."""
    return _checked[0]


class SeqparParityError(AssertionError):
    """The sharded frame differs from the replicated one. ``node``: the first original graph node
    whose value differs (forward), ``parameter``: the input whose gradient differs (backward);
    ``error`` and ``tolerance``: the relative error found and the one allowed."""

    def __init__(self, message: str, *, frame: str, node: str | None = None, parameter: str | None = None,
                 error: float = float("nan"), tolerance: float = float("nan")):
        super().__init__(message)
        self.frame, self.node, self.parameter, self.error, self.tolerance = frame, node, parameter, error, tolerance


def _tolerance(t: torch.Tensor, which: int, precision: torch.dtype | None = None) -> float:
    """The tolerance for a value of ``t``'s dtype computed at ``precision`` (the frame's lowest)."""
    loosest = max((TOLERANCES.get(d, TOLERANCES[torch.float32]) for d in (t.dtype, precision) if d is not None),
                  key=lambda tol: tol[0])
    return loosest[which]


def frame_precision(gm: fx.GraphModule) -> torch.dtype:
    """The lowest floating precision any value of the frame has (its example values): an fp32 loss
    computed from bf16 activations is only as exact as bf16."""
    found = {torch.float32}
    for n in gm.graph.nodes:
        for v in _flat(n.meta.get("example_value")):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                found.add(v.dtype)
    return max(found, key=lambda d: TOLERANCES.get(d, TOLERANCES[torch.float32])[0])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error in float64; exact equality for integers and booleans; inf for a shape
    mismatch or a non-finite difference."""
    if a.shape != b.shape:
        return float("inf")
    if not (a.is_floating_point() or a.is_complex()):
        return 0.0 if torch.equal(a, b) else float("inf")
    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    a, b = a.detach().to(wide), b.detach().to(wide)
    diff = float((a - b).norm())
    if diff != diff or diff == float("inf"):
        return float("inf")
    ref = float(b.norm())
    return diff / ref if ref > 0 else diff


def _agreed(errors: list[float], pg) -> list[float]:
    """The largest of every rank's errors, per entry (one all-reduce): every rank decides alike."""
    if not errors:
        return []
    values = torch.tensor([e if e == e else float("inf") for e in errors], dtype=torch.float64)
    return control_all_reduce_max(values, pg).tolist()


def _flat(outs) -> list:
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]


def parameter_name(placeholder: str) -> str:
    """``l_self_modules_h_modules_0_parameters_weight_`` → ``h.0.weight`` (Dynamo's lifted names)."""
    name = re.sub(r"^l_(self_)?", "", placeholder)
    return re.sub(r"_?(modules|parameters|buffers)_", ".", name).strip("._") or placeholder


def _draws_random_numbers(gm: fx.GraphModule) -> str | None:
    """What in the frame draws random numbers, or None (dropout with p = 0 or in eval draws none)."""
    import torch.nn.functional as F
    dropouts = {F.dropout, torch.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
    randoms = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.bernoulli,
               torch.normal, torch.randperm, torch.multinomial}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in dropouts:
            p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5)
            training = n.kwargs.get("training", n.kwargs.get("train", n.args[2] if len(n.args) > 2 else True))
            if not (isinstance(p, (int, float)) and p == 0) and training is not False:
                return f"dropout p={p} at node {n.name}"
        elif n.op == "call_function" and n.target in randoms:
            return f"{n.target.__name__} at node {n.name}"
        elif n.op == "call_method" and n.target in ("bernoulli_", "uniform_", "normal_", "random_", "exponential_"):
            return f"Tensor.{n.target} at node {n.name}"
    return None


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _reference_input(x):
    """The same input for the replicated run, whole, and safe from what either run writes into it:
    parameters as they are (their gradients are taken through both runs), other tensors copied
    (a sequence shard gathered), gradient-carrying ones as fresh leaves."""
    if isinstance(x, ProvedMask):
        return x.full_tensor()
    if isinstance(x, SequenceShard):
        return full_tensor(x.detach()).clone().requires_grad_(x.requires_grad)
    if isinstance(x, torch.nn.Parameter) or not isinstance(x, torch.Tensor):
        return x
    return x.detach().clone().requires_grad_(x.requires_grad)


class _Recorder:
    """Wraps the inner compiled function to keep the local arguments of the call being checked."""

    def __init__(self, fn: Callable):
        self.fn, self.args, self.armed = fn, None, False

    def __call__(self, *args):
        if self.armed:
            self.args = args
        return self.fn(*args)


def verifying(compiled: Callable, inner: _Recorder, *, pristine: fx.GraphModule, sharded: fx.GraphModule,
              pg, opts: dict, frame: str) -> Callable:
    """``compiled`` (the frame at run time) checked on its first call or on every call (module
    doc). ``inner`` must be the recorder around the inner compiled function ``compiled`` calls."""
    state = {"calls": 0}
    placeholders = [n for n in pristine.graph.nodes if n.op == "placeholder"]
    random_use = _draws_random_numbers(pristine)
    precision = frame_precision(pristine)

    def run(*args):
        state["calls"] += 1
        if opts["verify"] == "first" and state["calls"] > 1:
            return compiled(*args)
        if random_use is not None:
            if state["calls"] == 1 and dist.get_rank(pg) == 0:
                warnings.warn(f"seqpar: SEQPAR_VERIFY does not check frame {frame}: it draws random numbers "
                              f"({random_use}), which a sharded run draws per shard", stacklevel=2)
            return compiled(*args)
        _checked[0] += 1
        ref_args = [_reference_input(a) for a in args]
        before = _rng_state()
        inner.armed = True
        try:
            outs = compiled(*args)
        finally:
            inner.armed = False
        local_args, inner.args = inner.args, None
        after = _rng_state()
        _set_rng_state(before)
        ref_outs = _flat(pristine(*ref_args))
        _set_rng_state(after)
        full_outs = [_whole_output(o, i, sharded) for i, o in enumerate(_flat(outs))]
        _check_forward(full_outs, ref_outs, pg, frame, precision, lambda: _first_differing_node(
            pristine, ref_args, sharded, local_args, pg, before, after, precision))
        if torch.is_grad_enabled():
            _check_gradients(full_outs, ref_outs, args, ref_args, placeholders, pg, opts, frame, precision)
        return outs
    return run


def _whole_output(o, i: int, sharded: fx.GraphModule):
    """Output ``i`` as the whole value (differentiable): shards gathered, local exits
    (``SEQPAR_OUTPUT=local``) wrapped and gathered, proved masks materialised."""
    local_exits = getattr(sharded, "seqpar_local_exits", None) or []
    if isinstance(o, ProvedMask):
        return o.full_tensor()
    if isinstance(o, SequenceShard):
        return full_tensor(o)
    if i < len(local_exits) and local_exits[i] is not None and isinstance(o, torch.Tensor):
        return full_tensor(from_local(o, local_exits[i]))
    return o


def _check_forward(full_outs, ref_outs, pg, frame, precision, diagnose) -> None:
    pairs = [(o, r) for o, r in zip(full_outs, ref_outs) if isinstance(o, torch.Tensor) and isinstance(r, torch.Tensor)]
    errors = _agreed([_rel(o, r) for o, r in pairs], pg)
    bad = [(i, e, _tolerance(r, 0, precision)) for i, (e, (_, r)) in enumerate(zip(errors, pairs))
           if e > _tolerance(r, 0, precision)]
    if len(full_outs) != len(ref_outs):
        bad.append((len(pairs), float("inf"), 0.0))
    if not bad:
        return
    i, err, tol = bad[0]
    node, node_err, placement = diagnose()
    where = (f"the first graph node that differs is {node!r} (placement {placement}, relative error {node_err:.2e})"
             if node is not None else "no single graph node could be named (the values compared node by node agree)")
    raise SeqparParityError(f"seqpar: SEQPAR_VERIFY: frame {frame} differs from the replicated run: output {i} has a "
                            f"relative error of {err:.2e} (tolerance {tol:.0e}); {where}", frame=frame, node=node,
                            error=node_err if node is not None else err, tolerance=tol)


def _check_gradients(full_outs, ref_outs, args, ref_args, placeholders, pg, opts, frame, precision) -> None:
    outs = [(o, r) for o, r in zip(full_outs, ref_outs) if isinstance(o, torch.Tensor) and o.requires_grad
            and o.is_floating_point() and isinstance(r, torch.Tensor) and r.requires_grad]
    model_state = [i for i, a in enumerate(args) if isinstance(a, torch.nn.Parameter) and a.requires_grad]
    others = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad and i not in model_state
              and opts["grad_reduce"] != "none"]
    targets = model_state + others
    if not outs or not targets:
        return
    g = torch.Generator().manual_seed(_COTANGENT_SEED)
    cotangents = [torch.randn(tuple(o.shape), generator=g, dtype=torch.float64).to(o.dtype).to(o.device)
                  for o, _ in outs]
    # the user's backward() follows: keep the graph (the frame is compiled without donated buffers,
    # and aot_autograd checks the flag again when a backward keeps the graph)
    with torch._functorch.config.patch(donated_buffer=False):
        got = torch.autograd.grad([o for o, _ in outs], [args[i] for i in targets], cotangents, retain_graph=True,
                                  allow_unused=True)
    want = torch.autograd.grad([r for _, r in outs], [ref_args[i] for i in targets], cotangents, allow_unused=True)
    errors = []
    for i, a, b in zip(targets, got, want):
        if a is None or b is None:
            errors.append(0.0 if a is None and b is None else float("inf"))
            continue
        a = full_tensor(a) if isinstance(a, SequenceShard) else a
        if i in model_state and opts["grad_reduce"] == "none":      # partial: the group's sum is the gradient
            a = a.clone()
            dist.all_reduce(a, group=pg)
        errors.append(_rel(a, b))
    errors = _agreed(errors, pg)
    for i, err, b in zip(targets, errors, want):
        tol = _tolerance(b, 1, precision) if b is not None else TOLERANCES[precision][1]
        if err > tol:
            name = parameter_name(placeholders[i].name) if i < len(placeholders) else f"input {i}"
            kind = "parameter" if i in model_state else "input"
            raise SeqparParityError(f"seqpar: SEQPAR_VERIFY: frame {frame}: the gradient of {kind} {name} differs from "
                                    f"the replicated run's: relative error {err:.2e} (tolerance {tol:.0e})",
                                    frame=frame, parameter=name, error=err, tolerance=tol)


class _Values(fx.Interpreter):
    """Runs a graph and keeps the value of every node named in ``keep``."""

    def __init__(self, gm, keep):
        super().__init__(gm)
        self.keep, self.values = keep, {}

    def run_node(self, n):
        value = super().run_node(n)
        if n.name in self.keep:
            self.values[n.name] = value
        return value


def _first_differing_node(pristine, ref_args, sharded, local_args, pg, before, after, precision):
    """(original node name, relative error, placement) of the first node of the original graph
    whose sharded value, gathered, differs from its replicated value; (None, nan, None) if none."""
    node_map = getattr(sharded, "seqpar_node_map", {}) or {}
    S, schedule, group_name = sharded.seqpar_layout
    order = [n.name for n in pristine.graph.nodes if n.name in node_map]
    with torch.no_grad():
        _set_rng_state(before)
        got = _Values(sharded, {node_map[k][0] for k in order})
        got.run(*local_args)
        _set_rng_state(before)
        want = _Values(pristine, set(order))
        want.run(*ref_args)
        _set_rng_state(after)
        errors, compared = [], []
        for name in order:                      # the same names and placements on every rank: gathers line up
            new, placement = node_map[name]
            if new not in got.values or name not in want.values:
                continue
            whole = _gather(got.values[new], placement, S, schedule, group_name)
            ref = want.values[name]
            if whole is None or not _comparable(whole, ref):
                continue
            errors.append(max((_rel(a, b) for a, b in zip(_flat(whole), _flat(ref))
                               if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)), default=0.0))
            compared.append((name, placement, ref))
    errors = _agreed(errors, pg)
    for (name, placement, ref), err in zip(compared, errors):
        tensor = next((r for r in _flat(ref) if isinstance(r, torch.Tensor)), None)
        if tensor is not None and err > _tolerance(tensor, 0, precision):
            return name, err, placement
    return None, float("nan"), None


def _comparable(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return True
    return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)


def _gather(value, placement, S: int, schedule: str, group_name: str) -> Any:
    """The whole value of a node of the sharded graph, by its placement; None when it has no
    whole form here (a part of the sequence)."""
    if isinstance(placement, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(placement):
            return None
        parts = [_gather(v, p, S, schedule, group_name) for v, p in zip(value, placement)]
        return None if any(p is None for p in parts) else parts
    if isinstance(placement, SeqRange):
        return None
    if isinstance(placement, Shard):
        if not isinstance(value, torch.Tensor):
            return None
        return gather_local(value, ShardSpec(placement.dim, S, schedule, group_name, placement.pre, placement.post))
    if placement is None or isinstance(placement, Replicate):
        return value
    return None
