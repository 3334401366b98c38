"""One training step of a real model (``real_model_zoo``) through seqpar on each spawned rank,
against the same step in this process: the real-code tier's measurement.

A case never raises: it returns what happened (``status``: ``exact``, ``wrong`` or ``crash``,
with the errors, the seqpar warnings, ring calls and gathers), so one spawn reports every model.
Fully sharded means exact, the ring ran, and nothing was gathered: no gather seqpar warned of,
and no all-gather of activations in the step (``gathers``) that it did not.
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
from real_model_zoo import batch_for, build  # noqa: E402

__all__ = ["real_model_case", "run_real_models", "LOSS_TOL", "GRAD_TOL"]

LOSS_TOL, GRAD_TOL = 1e-5, 1e-4          # fp32, the README's tolerances


def _rel(a, b, floor: float = 0.0) -> float:
    """||a - b|| / max(||b||, floor) in float64; inf when a is not finite. ``floor`` keeps a
    gradient that is zero in exact arithmetic (BERT's key bias: softmax ignores a per-query
    constant, its gradient is ~1e-12) from turning rounding noise into a large relative error."""
    a, b = a.detach().double(), b.detach().double()
    num = (a - b).norm()
    if not torch.isfinite(num):
        return float("inf")
    den = max(float(b.norm()), floor)
    return float(num) / den if den > 0 else float(num)


def _fallback_kind(messages: list[str]) -> list[str]:
    """The reasons a model is not fully sharded, from seqpar's warnings (short forms)."""
    kinds = []
    for m in messages:
        if "cannot shard" in m:
            kinds.append("gathers: " + m.split("cannot shard ", 1)[1].split(" at ", 1)[0][:90])
        elif "runs replicated" in m or "run replicated" in m or "ran replicated" in m:
            kinds.append("replicated: " + m[:110])
        elif "gathering the sequence and computing it replicated" in m:     # an eager op between frames
            kinds.append("gathers (eager): " + m.split("eager op ", 1)[1].split(" on a ", 1)[0][:90])
        elif "gathered at this frame's exit" in m:
            kinds.append("exit gather")
    return list(dict.fromkeys(kinds))


def real_model_case(rank: int, P: int, name: str, *, S: int = 32, B: int = 2, inner: str = "aot_eager",
                    **options) -> dict:
    """One step of ``name`` compiled with seqpar against the same step eagerly in one process."""
    from step_probes import SequenceGatherCounter
    result = {"name": name}
    try:
        model, ref = build(name), build(name)
        ref.load_state_dict(model.state_dict())
        kwargs = batch_for(name, B=B, S=S)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=sp.backend(inner=inner, **options))
        with warnings.catch_warnings(record=True) as caught, sp.stats() as st, SequenceGatherCounter() as gathers:
            warnings.simplefilter("always")
            torch.manual_seed(1234)      # a model that draws in training (Phimoe's sparsemixer) draws alike
            out = compiled(**kwargs)
            out.loss.backward()
            logits = out.logits.detach().clone() if hasattr(out.logits, "full_tensor") else out.logits.detach()
            loss = out.loss.detach()
        torch.manual_seed(1234)
        r = ref(**kwargs)
        r.loss.backward()
        ref_grads = [q.grad for q in ref.parameters() if q.grad is not None]
        floor = 1e-5 * float(torch.stack([g.double().norm() for g in ref_grads]).norm())   # of the whole gradient
        grads = {n: _rel(p.grad, q.grad, floor) for (n, p), q in zip(model.named_parameters(), ref.parameters())
                 if q.grad is not None and p.grad is not None}
        missing = [n for (n, p), q in zip(model.named_parameters(), ref.parameters())
                   if q.grad is not None and p.grad is None]
        for n in missing:
            grads[n] = float("inf")
        messages = [str(w.message) for w in caught if "seqpar" in str(w.message)]
        worst = max(grads.items(), key=lambda kv: kv[1]) if grads else ("-", 0.0)
        result.update(loss=_rel(loss, r.loss), logits=_rel(logits, r.logits), worst_grad=worst,
                      missing_grads=missing, ring_calls=st.attention_forward_calls, gathers=gathers.calls,
                      warnings=messages, fallbacks=_fallback_kind(messages))
        exact = result["loss"] <= LOSS_TOL and result["logits"] <= LOSS_TOL and worst[1] <= GRAD_TOL
        result["status"] = "exact" if exact else "wrong"
        if gathers.calls and not result["fallbacks"]:
            # a gather of activations seqpar did not say (the backward of a slice of a full-length
            # value): the model is not fully sharded, and the table names it
            result["fallbacks"] = [f"unwarned gathers: {gathers.calls} all-gather(s) of activations in the step"]
        result["fully_sharded"] = exact and not result["fallbacks"] and st.attention_forward_calls > 0
    except Exception as err:  # noqa: BLE001 - the tier reports crashes, it does not stop at one
        result.update(status="crash", error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                      traceback=traceback.format_exc()[-3000:], fully_sharded=False)
    return result


def run_real_models(rank: int, P: int, names: list[str], options: dict | None = None) -> dict:
    return {name: real_model_case(rank, P, name, **(options or {})) for name in names}
