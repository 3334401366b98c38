"""Training steps through the seqpar backend on spawned ranks under each checkpoint policy and
FFN chunking, returning gradients and attention counters (issue 4). One spawn runs every case."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))

import seqpar_compiler as sp  # noqa: E402
from models import GPT, GPTConfig, Llama, LlamaConfig  # noqa: E402

MODELS = {"gpt": lambda: GPT(GPTConfig(n_layer=2)), "llama": lambda: Llama(LlamaConfig(n_layer=2))}


def training_step(rank, P, *, model, inner="aot_eager", S=32, **options):
    """One forward + backward; the gradients (by name), the loss and this rank's ring counters."""
    torch.manual_seed(0)
    m = MODELS[model]()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (2, S), generator=g)
    tgt = torch.randint(0, 256, (2, S), generator=g)
    torch._dynamo.reset()
    cm = torch.compile(m, backend=sp.backend(inner=inner, schedule="zigzag", **options))
    with sp.stats() as st:
        _, loss = cm(idx, tgt)
        loss.backward()
    return {"loss": float(loss), "grads": {n: p.grad.clone() for n, p in m.named_parameters()},
            "forward_calls": st.attention_forward_calls, "backward_calls": st.attention_backward_calls,
            "layers": len(m.blocks)}


def eager_step(rank, P, *, model, S=32):
    """The same step in eager on one device: the reference."""
    torch.manual_seed(0)
    m = MODELS[model]()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (2, S), generator=g)
    tgt = torch.randint(0, 256, (2, S), generator=g)
    _, loss = m(idx, tgt)
    loss.backward()
    return {"loss": float(loss), "grads": {n: p.grad.clone() for n, p in m.named_parameters()}}


def run_cases(rank, P, cases):
    fns = {"train": training_step, "eager": eager_step}
    return {name: fns[kind](rank, P, **kw) for name, kind, kw in cases}
