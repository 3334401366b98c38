"""Spawned-rank cases for the compile agreement: a failure injected into one stage of the sharded
compile on one rank only, and what the whole group does about it."""
from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))

import seqpar_compiler as sp  # noqa: E402
from seqpar_compiler import compile_agreement  # noqa: E402
from models import GPT, GPTConfig  # noqa: E402

STAGES = ["frame edges", "canonicalize", "placements and rewrite", "blockwise FFN", "partitioner", "inner compile",
          "inner backward"]


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def fault_case(rank: int, P: int, *, stage: str | None, fail_rank: int = 1, S: int = 16, **options) -> dict:
    """One training step of a 1-layer GPT with ``stage`` failing on group rank ``fail_rank``,
    against the same step eagerly in this process."""
    cfg = GPTConfig(n_layer=1, block_size=64)
    torch.manual_seed(0)
    model, ref = GPT(cfg), GPT(cfg)
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (2, S), generator=g)
    tgt = torch.randint(0, cfg.vocab_size, (2, S), generator=g)
    compile_agreement._FAULTS.clear()
    if stage is not None:
        compile_agreement._FAULTS[stage] = {fail_rank}
    torch._dynamo.reset()
    out = {}
    try:
        with warnings.catch_warnings(record=True) as caught, sp.stats() as st:
            warnings.simplefilter("always")
            compiled = torch.compile(model, backend=sp.backend(inner="aot_eager", **{"schedule": "zigzag", **options}))
            _, loss = compiled(idx, tgt)
            loss.backward()
    except Exception as err:  # noqa: BLE001 - the case reports how every rank ended
        return {"raised": f"{type(err).__name__}: {err}"[:1500]}
    finally:
        compile_agreement._FAULTS.clear()
    _, ref_loss = ref(idx, tgt)
    ref_loss.backward()
    out["loss"] = _rel(loss, ref_loss)
    out["grad"] = max(_rel(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()))
    out["ring_calls"] = st.attention_forward_calls
    out["reports"] = [str(w.message) for w in caught if "please report" in str(w.message)]
    return out


def run_fault_cases(rank: int, P: int, cases: list[tuple[str, dict]]) -> dict:
    return {name: fault_case(rank, P, **kw) for name, kw in cases}
