"""One compiled model called at several sequence lengths on spawned ranks (issue 13 follow-up).

Each case returns, per length, the relative errors of the loss and of every parameter gradient
against single-process eager and this rank's ring-forward count; and in all, Dynamo's compiles
(frames compiled by the backend) and the seqpar / torch.fx warnings. One spawn runs every case.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))

import seqpar_compiler as sp  # noqa: E402
from models import GPT, GPTConfig, Llama, LlamaConfig  # noqa: E402

MODELS = {"gpt": lambda: GPT(GPTConfig()), "llama": lambda: Llama(LlamaConfig())}


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def lengths_case(rank, P, *, model, lengths, dynamic=True, B=2):
    """The example model compiled once, called at each length (training step each time)."""
    torch.manual_seed(0)
    m = MODELS[model]()
    torch.manual_seed(0)
    ref = MODELS[model]()
    counter = torch._dynamo.testing.CompileCounter()
    seqpar = sp.backend(inner="aot_eager", schedule="zigzag")

    def counting(gm, ex):
        counter(gm, ex)
        return seqpar(gm, ex)
    torch._dynamo.reset()
    cm = torch.compile(m, backend=counting, dynamic=dynamic)
    per_length = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for S in lengths:
            g = torch.Generator().manual_seed(S)
            idx, tgt = torch.randint(0, 256, (B, S), generator=g), torch.randint(0, 256, (B, S), generator=g)
            m.zero_grad()
            ref.zero_grad()
            with sp.stats() as st:
                loss = cm(idx, tgt)[1]
                loss.backward()
            ref_loss = ref(idx, tgt)[1]
            ref_loss.backward()
            grads = {n: _rel(p.grad, q.grad) for (n, p), q in zip(m.named_parameters(), ref.parameters())}
            per_length[S] = {"loss": _rel(loss, ref_loss), "grads": grads, "ring_calls": st.attention_forward_calls}
    return {"lengths": per_length, "compiles": counter.frame_count, "layers": len(m.blocks),
            "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)],
            "fx_warnings": [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                            if f"{os.sep}torch{os.sep}fx{os.sep}" in w.filename]}


def hf_lengths_case(rank, P, **kw):
    import model_workers
    return model_workers.hf_case(rank, P, arch="llama", impl="sdpa", **kw)


def run_cases(rank, P, cases):
    fns = {"lengths": lengths_case, "hf": hf_lengths_case}
    return {name: fns[kind](rank, P, **kw) for name, kind, kw in cases}
