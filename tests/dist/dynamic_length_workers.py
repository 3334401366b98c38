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
    a = a.full_tensor() if hasattr(a, "full_tensor") else a         # a SequenceShard (or DTensor) read whole
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def _ids_and_targets(S: int, B: int):
    g = torch.Generator().manual_seed(S)
    return torch.randint(0, 256, (B, S), generator=g), torch.randint(0, 256, (B, S), generator=g)


def train_per_length(lengths, m, ref, batch_of, loss_of, ref_loss_of, counter=None, grad_of=lambda p: p.grad):
    """One training step per length for the compiled model (``loss_of(batch)``, parameters of
    ``m``) and its eager twin ``ref``: per length, the relative errors of the loss and of every
    parameter gradient, this rank's ring-forward count and (with ``counter``) Dynamo's compiles so
    far; and the warnings caught throughout."""
    per_length = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for S in lengths:
            batch = batch_of(S)
            m.zero_grad()
            ref.zero_grad()
            with sp.stats() as st:
                loss = loss_of(batch)
                loss.backward()
            ref_loss = ref_loss_of(batch)
            ref_loss.backward()
            grads = {n: _rel(grad_of(p), q.grad) for (n, p), q in zip(m.named_parameters(), ref.parameters())}
            per_length[S] = {"loss": _rel(loss, ref_loss), "grads": grads, "ring_calls": st.attention_forward_calls}
            if counter is not None:
                per_length[S]["compiles"] = counter.frame_count
    return per_length, caught


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
    per_length, caught = train_per_length(
        lengths, m, ref, lambda S: _ids_and_targets(S, B), lambda batch: cm(*batch)[1], lambda batch: ref(*batch)[1])
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
