"""The idiom corpus (issue 12): tiny modules, one way of writing model code each, that must shard.

An idiom is a tiny module (width <= 32, S = 32, one layer) with one self-attention, so the frame
is sharded, plus the one idiom under test. The harness compiles it with
``seqpar_compiler.backend(schedule="zigzag", inner="aot_eager")`` on every rank, runs forward and
backward, and compares outputs (1e-5) and every parameter gradient (1e-4) with the same module
in single-process eager. It also records how many attention calls ran as the ring on this rank
and every seqpar warning, so a test can say "fully sharded": the expected ring calls and no
fallback warning (or exactly the expected one).

Writing an idiom::

    @idiom("unbind-kv", ring_calls=1)
    def _build():
        return MyModule(), (token_ids(),)

``build`` takes no arguments: the harness seeds torch's RNG (``SEED``) before calling it, so
weights and inputs are deterministic. The module returns a tensor or a tuple of tensors; the
harness reduces them to one scalar with fixed random weights (so every output element gets a
distinct gradient) and calls backward on it. ``fallback``: None when no fallback warning is
allowed, else a substring the warned fallback must contain (name the op).

Idioms live in ``idioms_ops.py`` (op coverage), ``idioms_sequence.py`` (ops along the sequence:
chunked losses, max/min) and ``idioms_attention.py`` (attention forms); ``load_idioms()``
imports them all.
"""
from __future__ import annotations

import copy
import importlib
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Idiom", "IDIOMS", "idiom", "load_idioms", "run_idioms", "SEED", "B", "S", "C", "H", "D", "V",
           "token_ids", "labels", "CausalSelfAttention"]

SEED = 0
B, S, C, H, D, V = 2, 32, 32, 4, 8, 64      # batch, sequence, width, heads, head dim, vocab
FALLBACK_MARK = "cannot shard"               # every gather fallback's warning says this


@dataclass(frozen=True)
class Idiom:
    """One way of writing model code.

    Attributes:
        name: unique, kebab-case: what the idiom is (``"unbind-kv"``).
        build: ``() -> (module, inputs)``; called after ``torch.manual_seed(SEED)``.
        ring_calls: attention calls per forward expected to run as the ring on every rank.
        fallback: None if no fallback warning is allowed; else a substring that a warned
            fallback must contain (the op that may not shard exactly, e.g. ``"cumsum"``).
    """

    name: str
    build: Callable[[], tuple[nn.Module, tuple]]
    ring_calls: int = 1
    fallback: str | None = None


IDIOMS: dict[str, Idiom] = {}


def idiom(name: str, *, ring_calls: int = 1, fallback: str | None = None):
    """Register ``build`` as the idiom ``name`` (a decorator)."""
    def register(build):
        if name in IDIOMS:
            raise ValueError(f"idiom {name!r} is registered twice")
        IDIOMS[name] = Idiom(name, build, ring_calls, fallback)
        return build
    return register


def load_idioms() -> dict[str, Idiom]:
    """Import every idiom module (they register themselves) and return the registry."""
    for mod in ("idioms_ops", "idioms_sequence", "idioms_attention"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise
    return IDIOMS


# -- building blocks for idioms ------------------------------------------------------------------
def token_ids(batch: int = B, seq: int = S, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))


def labels(batch: int = B, seq: int = S, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))


class CausalSelfAttention(nn.Module):
    """The plain attention every idiom carries so that its frame is sharded.

    x [B, S, C] -> [B, S, C]; qkv by one linear, SDPA with is_causal.
    """

    def __init__(self, width: int = C, heads: int = H):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (t.view(b, s, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # [B, H, S, D]
        return self.proj(y.transpose(1, 2).reshape(b, s, c))


# -- the worker ------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if a.is_complex() or b.is_complex():
        a, b = torch.view_as_real(a.to(torch.complex128)), torch.view_as_real(b.to(torch.complex128))
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _scalar(outputs: list[torch.Tensor]) -> torch.Tensor:
    """One scalar from every floating output, with fixed random weights (distinct gradients)."""
    g = torch.Generator().manual_seed(1234)
    total = 0
    for o in outputs:
        if o.is_floating_point() and o.requires_grad:
            w = torch.randn(o.shape, generator=g, dtype=o.dtype)
            total = total + (o * w).sum()
    return total


def _run_one(item: Idiom, schedule: str, inner: str) -> dict:
    import seqpar_compiler as sp
    torch.manual_seed(SEED)
    module, inputs = item.build()
    ref = copy.deepcopy(module)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, sp.stats() as st:
        warnings.simplefilter("always")
        compiled = torch.compile(module, backend=sp.backend(schedule=schedule, inner=inner))
        outs = _tensors(compiled(*inputs))
        loss = _scalar(outs)
        if isinstance(loss, torch.Tensor):
            loss.backward()
    ref_outs = _tensors(ref(*inputs))
    ref_loss = _scalar(ref_outs)
    if isinstance(ref_loss, torch.Tensor):
        ref_loss.backward()
    out_err = max((_rel(a, b) if a.is_floating_point() or a.is_complex() else float(not torch.equal(a, b))
                   for a, b in zip(outs, ref_outs)), default=0.0)
    if len(outs) != len(ref_outs) or any(a.shape != b.shape for a, b in zip(outs, ref_outs)):
        out_err = float("inf")
    grads = {}
    for (n, p), q in zip(module.named_parameters(), ref.parameters()):
        if q.grad is None and p.grad is None:
            continue
        grads[n] = float("inf") if (p.grad is None) != (q.grad is None) else _rel(p.grad, q.grad)
    return {"out": out_err, "grads": grads, "ring_calls": st.attention_forward_calls,
            "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)]}


def run_idioms(rank: int, P: int, names: list[str], schedule: str = "zigzag", inner: str = "aot_eager") -> dict:
    """Run the named idioms on this rank; plain data per idiom (an ``error`` traceback if it
    raised, so one broken idiom does not take the whole spawn down)."""
    load_idioms()
    results = {}
    for name in names:
        try:
            results[name] = _run_one(IDIOMS[name], schedule, inner)
        except Exception:  # noqa: BLE001 - reported per idiom by the test
            results[name] = {"error": traceback.format_exc()[-4000:]}
    return results


def check_idiom_result(item: Idiom, r: dict, rank: int) -> None:
    """Assert exactness, the ring call count and the allowed fallback for one rank's result."""
    assert "error" not in r, f"rank {rank}: {item.name} raised:\n{r.get('error')}"
    worst = max(r["grads"].items(), key=lambda kv: kv[1], default=("-", 0.0))
    falls = [w for w in r["warnings"] if FALLBACK_MARK in w]
    print(f"{item.name} rank {rank}: out {r['out']:.1e} worst grad {worst} ring {r['ring_calls']} "
          f"fallbacks {len(falls)}")
    assert r["out"] <= 1e-5, f"{item.name}: outputs differ from eager by {r['out']:.2e}"
    assert worst[1] <= 1e-4, f"{item.name}: gradient {worst[0]} differs from eager by {worst[1]:.2e}"
    assert r["grads"], f"{item.name}: no parameter received a gradient"
    assert r["ring_calls"] == item.ring_calls, (
        f"{item.name}: {r['ring_calls']} ring attention calls, expected {item.ring_calls}; warnings: {r['warnings']}")
    if item.fallback is None or rank != 0:      # a fallback is said once per group, by its rank 0
        assert not falls, f"{item.name}: unexpected fallback on rank {rank}: {falls}"
    else:
        assert falls and all(item.fallback in w for w in falls), (
            f"{item.name}: expected a warned fallback naming {item.fallback!r}, got {falls}")
