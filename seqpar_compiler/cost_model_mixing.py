"""What the sequence-mixing ops cost per step: halo rows, carried totals, what is saved.

A graph's convolutions over time, rolls, flips and scans along the sequence (``mixing_specs``,
read from the Dynamo graph before placement) are described per layout by ``traffic``: the rows
a rank receives per call (the halo of a convolution: the d·(k−1) positions before each of its
runs, or both sides for a centred one; a roll's boundary rows; a scan's per-run totals from every
rank), the bytes forward and backward (the halo's gradient goes back; the totals' gradients are
all-reduced), the number of messages, and the bytes a convolution saves for its backward (its
runs with their halos: S/P + runs·(L+R) positions, where one process saves S + L + R).

A linear recurrence collapsed by ``passes/recurrences.py`` (``seqpar::carried_recurrence``)
carries one state per rank to the next (its gradient back): a message of the state's bytes,
P−1 hops in sequence, only on a contiguous layout.

``auto`` uses it twice (``choose_schedule``): a layout on which an op cannot run sharded (striped:
a rank's tokens are not runs) is no candidate for a graph that has one, and the others pay the
seconds of their traffic at the profile's bandwidth and latency. The dump lists the traffic
(``dump.record_sharded``).

Shape legend: S global length, P group size, a row = one sequence position of the op's input
(every other dim: batch, channels, features), ``row_bytes`` its size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .runtime.layout import layout_of, local_segments
from .runtime.sequence_fetch import fetch_map, fetched_rows_from_others, halo_kind, shift_kind
from .runtime.sequence_mixing import halo_runs_ok, scan_runs_ok

__all__ = ["MixingSpec", "MixingTraffic", "mixing_specs", "traffic", "layout_ok", "mixing_seconds", "describe"]


@dataclass(frozen=True)
class MixingSpec:
    """One sequence-mixing call: ``kind`` ``halo`` (a convolution: ``left``/``right`` positions),
    ``shift`` (a roll by ``left``), ``flip`` or ``scan`` (``op`` names it); ``row_bytes`` one
    position of its input; ``backward`` whether a gradient flows back."""

    kind: str
    op: str
    S: int
    row_bytes: int
    left: int = 0
    right: int = 0
    backward: bool = True


@dataclass(frozen=True)
class MixingTraffic:
    """Per call, on the busiest rank: rows and bytes received forward and sent back in the
    backward, messages (point-to-point, or collectives for a scan), bytes saved for the backward
    that one process would not split (a convolution's haloed runs)."""

    rows: int
    bytes_forward: int
    bytes_backward: int
    messages: int
    saved_bytes: int


def _fetch_kind(spec: MixingSpec) -> str | None:
    if spec.kind == "halo":
        return halo_kind(spec.left, spec.right)
    if spec.kind == "shift":
        return shift_kind(spec.left % spec.S)
    return "flip" if spec.kind == "flip" else None


def layout_ok(spec: MixingSpec, schedule: str, P: int) -> bool:
    """Whether ``spec`` runs sharded on ``schedule`` (a roll or flip does on every layout; a
    carried recurrence passes its state in sequence order, so only a contiguous one)."""
    if spec.kind == "state":
        return layout_of(schedule).contiguous
    if spec.kind == "halo":
        return halo_runs_ok(schedule, P, spec.S // P)
    if spec.kind == "scan":
        return scan_runs_ok(schedule, P, spec.S // P)
    return True


def traffic(spec: MixingSpec, schedule: str, P: int) -> MixingTraffic:
    """What one call moves and saves on ``schedule`` (module docstring)."""
    back = 1 if spec.backward else 0
    if spec.kind == "state":          # one state to the next rank; its gradient comes back
        return MixingTraffic(1, spec.row_bytes, spec.row_bytes * back, 1 + back, spec.row_bytes * back)
    kind = _fetch_kind(spec)
    if kind is not None:
        rows = max(fetched_rows_from_others(kind, schedule, r, P, spec.S) for r in range(P))
        saved = 0
        if spec.kind == "halo":
            runs = max(len(local_segments(schedule, r, P, spec.S // P)) for r in range(P))
            saved = (spec.S // P + runs * (spec.left + spec.right)) * spec.row_bytes * back
        messages = max(len(fetch_map(kind, schedule, r, P, spec.S).recv) for r in range(P))
        return MixingTraffic(rows, rows * spec.row_bytes, rows * spec.row_bytes * back, messages * (1 + back), saved)
    runs = len(local_segments(schedule, 0, P, spec.S // P))
    rows = (P - 1) * runs                               # every other rank's run totals
    return MixingTraffic(rows, rows * spec.row_bytes, P * runs * spec.row_bytes * back, 1 + back, 0)


def mixing_seconds(spec: MixingSpec, schedule: str, P: int, profile) -> float:
    """The traffic's seconds at the profile's neighbour bandwidth and per-message latency."""
    t = traffic(spec, schedule, P)
    seconds = (t.bytes_forward + t.bytes_backward) / profile.ring_bandwidth(P) + t.messages * profile.latency
    # a carried state crosses the ranks one after another: P−1 hops on the critical path
    return seconds * (P - 1) if spec.kind == "state" else seconds


def describe(spec: MixingSpec, schedule: str, P: int) -> str:
    """One line for the dump."""
    if not layout_ok(spec, schedule, P):
        return f"{spec.op}: not sharded on {schedule} (its tokens are not runs): gathered"
    t = traffic(spec, schedule, P)
    what = {"halo": f"halo of {spec.left}+{spec.right} positions per run", "shift": f"roll by {spec.left}",
            "flip": "flip", "scan": "run totals from every rank",
            "state": f"state passed rank to rank, {P - 1} hops in sequence"}[spec.kind]
    line = (f"{spec.op} ({what}): receives {t.rows} rows = {t.bytes_forward} B forward, "
            f"{t.bytes_backward} B backward, {t.messages} messages per step")
    return line + (f"; saves {t.saved_bytes} B per rank for its backward" if t.saved_bytes else "")


# -- reading a Dynamo graph ------------------------------------------------------------------------
_SCANS = {torch.cumsum: "cumsum", torch.cumprod: "cumprod", torch.logcumsumexp: "logcumsumexp",
          "cumsum": "cumsum", "cumprod": "cumprod", "logcumsumexp": "logcumsumexp"}
_ROLLS = {torch.roll, "roll"}
_FLIPS = {torch.flip, "flip"}


def _example(node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _row_bytes(x: torch.Tensor, dim: int) -> int:
    return x.numel() // x.shape[dim] * x.element_size()


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _is_recurrence(target) -> bool:
    return getattr(target, "__name__", None) == "carried_recurrence" and \
        getattr(target, "__module__", "").endswith("passes.recurrences")


def _recurrence_state_bytes(node: fx.Node) -> int | None:
    """The bytes of the state a collapsed recurrence (``passes/recurrences.py``) carries."""
    import sys
    module = sys.modules.get(node.target.__module__)
    proved = getattr(module, "_PROVED", {}).get(node.args[0])
    if proved is None:
        return None
    from .runtime.recurrence_op import body_of
    body = body_of(proved.local)
    n = 1
    for d in body.state_shape:
        n *= int(d)
    return n * torch.empty((), dtype=body.state_dtype).element_size()


def mixing_specs(gm: fx.GraphModule, S: int) -> list[MixingSpec]:
    """The graph's convolutions over time, rolls, flips and scans along a dim of length ``S``
    (after ``passes/causal_conv.py`` made each padded convolution one node). A dim of that length
    is taken for the sequence: a scan along a square mask's rows counts too (a layout it rules out
    only costs speed)."""
    padded = torch.ops.seqpar.padded_conv1d.default
    out = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        target = node.target
        if _is_recurrence(target):
            state = _recurrence_state_bytes(node)
            if state is not None:
                grad = any(isinstance(_example(a), torch.Tensor) and _example(a).requires_grad for a in node.args[1:])
                out.append(MixingSpec("state", "carried_recurrence", S, state, backward=grad))
            continue
        x = _example(node.args[0]) if node.args else None
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            continue
        grad = bool(x.requires_grad)
        if target is padded and x.shape[-1] == S:
            out.append(MixingSpec("halo", "padded_conv1d", S, _row_bytes(x, -1), node.args[3], node.args[4], grad))
        elif target in (torch.conv1d, F.conv1d) and x.shape[-1] == S:
            w, pad = _example(_arg(node, 1, "weight")), _arg(node, 4, "padding", 0)
            pad = pad[0] if isinstance(pad, (list, tuple)) else pad
            if isinstance(w, torch.Tensor) and isinstance(pad, int) and pad:
                out.append(MixingSpec("halo", "conv1d", S, _row_bytes(x, -1), pad, pad, grad))
        elif target in _SCANS:
            dim = _arg(node, 1, "dim")
            if isinstance(dim, int) and x.shape[dim] == S:
                out.append(MixingSpec("scan", _SCANS[target], S, _row_bytes(x, dim), backward=grad))
        elif target in _ROLLS or target in _FLIPS:
            dims = _arg(node, 2 if target in _ROLLS else 1, "dims")
            dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
            if len(dims) == 1 and isinstance(dims[0], int) and x.shape[dims[0]] == S:
                if target in _ROLLS:
                    shift = _arg(node, 1, "shifts")
                    shift = shift[0] if isinstance(shift, (list, tuple)) else shift
                    out.append(MixingSpec("shift", "roll", S, _row_bytes(x, dims[0]), int(shift), backward=grad))
                else:
                    out.append(MixingSpec("flip", "flip", S, _row_bytes(x, dims[0]), backward=grad))
    return out
