"""One training step of a hybrid model (``hybrid_zoo``) through seqpar on each spawned rank,
against the same step eagerly in this process, in float64 so every gradient is compared tightly.

A case returns what happened (errors, seqpar's warnings, ring calls, sequence gathers, the
full-length tensors saved for the backward); it never raises, so one spawn reports every model.
"""
from __future__ import annotations

import os
import sys
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))        # tests/step_probes.py

import seqpar_compiler as sp  # noqa: E402
from hybrid_zoo import batch, build  # noqa: E402

__all__ = ["hybrid_case", "run_hybrids"]


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


def _get(out, name):
    return out[name] if isinstance(out, dict) else getattr(out, name)


def hybrid_case(rank: int, P: int, name: str, S: int, *, B: int = 1, layers: int = 2,
                schedule: str = "ring") -> dict:
    from step_probes import SequenceGatherCounter, full_length_saves
    result = {"name": name, "S": S}
    try:
        model, ref = build(name, layers=layers).double(), build(name, layers=layers).double()
        ref.load_state_dict(model.state_dict())
        kwargs = {**batch(B, S), "use_cache": False}
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=sp.backend(inner="aot_eager", schedule=schedule))
        with warnings.catch_warnings(record=True) as caught, sp.stats() as st, SequenceGatherCounter() as gathers:
            warnings.simplefilter("always")

            def step():
                out = compiled(**kwargs)
                _get(out, "loss").backward()
                return _get(out, "loss").detach()
            saves, loss = full_length_saves(step, [kwargs["input_ids"], kwargs["labels"]], S)
        r = ref(**kwargs)
        _get(r, "loss").backward()
        grads = {n: _rel(p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())
                 if q.grad is not None and p.grad is not None and float(q.grad.norm()) > 0}
        missing = [n for (n, p), q in zip(model.named_parameters(), ref.parameters())
                   if q.grad is not None and p.grad is None]
        worst = max(grads.items(), key=lambda kv: kv[1])
        result.update(loss=_rel(loss, _get(r, "loss")), worst_grad=worst, grads=len(grads), missing=missing,
                      ring_calls=st.attention_forward_calls, gathers=gathers.calls, full_saves=saves,
                      warnings=[str(w.message) for w in caught if "seqpar" in str(w.message)], error=None)
    except Exception as err:  # noqa: BLE001 - reported, not raised: one spawn serves every case
        result.update(error=f"{type(err).__name__}: {err}"[:500], traceback=traceback.format_exc()[-3000:])
    return result


def run_hybrids(rank: int, P: int, cases: list[tuple]) -> dict:
    """``cases``: (name, S) or (name, S, options) tuples; results keyed by ``name@S``."""
    return {f"{c[0]}@{c[1]}": hybrid_case(rank, P, c[0], c[1], **(c[2] if len(c) > 2 else {})) for c in cases}
