"""One training step of ``TinyDiT`` through seqpar on each spawned rank against the same step
in this process (float64): the loss, every gradient, seqpar's warnings and the ring calls."""
from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))

import seqpar_compiler as sp  # noqa: E402
from token_grid_modules import TinyDiT  # noqa: E402

__all__ = ["run_dit_cases", "CASES"]

# name -> (schedule, TinyDiT options)
CASES = {
    "ring": ("ring", {}),
    "ulysses": ("ulysses", {}),
    "zigzag": ("zigzag", {}),
    "ring-refine-conv": ("ring", {"refine": True}),
    # the model compiled alone, broken inside unpatchify; the rest and the loss run eagerly
    "ring-graph-break-eager-loss": ("ring", {"graph_break": True}),
}


class _Step(torch.nn.Module):
    """The model and its loss in one compiled frame: the image never leaves it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, img, t, target):
        return ((self.model(img, t) - target) ** 2).mean()


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def _case(schedule: str, options: dict) -> dict:
    torch.manual_seed(0)
    model = TinyDiT(**options).double()
    ref = TinyDiT(**options).double()
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    target = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([3.0, 17.0], dtype=torch.float64)
    torch._dynamo.reset()
    backend = sp.backend(inner="aot_eager", schedule=schedule)
    if options.get("graph_break"):
        compiled = torch.compile(model, backend=backend)
        step = lambda img, t, target: ((compiled(img, t) - target) ** 2).mean()  # noqa: E731
    else:
        step = torch.compile(_Step(model), backend=backend)
    with warnings.catch_warnings(record=True) as caught, sp.stats() as st:
        warnings.simplefilter("always")
        loss = step(img, t, target)
        loss.backward()
    ref_loss = _Step(ref)(img, t, target)
    ref_loss.backward()
    grads = {n: _rel(p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())
             if q.grad is not None}
    return {"loss": _rel(loss, ref_loss), "grads": grads,
            "missing": [n for (n, p), q in zip(model.named_parameters(), ref.parameters())
                        if q.grad is not None and p.grad is None],
            "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)],
            "ring_calls": st.attention_forward_calls}


def run_dit_cases(rank: int, P: int, names: list[str]) -> dict:
    return {name: _case(*CASES[name]) for name in names}
