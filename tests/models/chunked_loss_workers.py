"""One training step of ``TinyLM`` with a library's chunked loss through seqpar on each spawned
rank against the same step in this process (float64): loss, every gradient, warnings, ring calls."""
from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))

import seqpar_compiler as sp  # noqa: E402
from chunked_loss_modules import TinyLM, TorchtuneChunkedCE, litgpt_chunked_cross_entropy  # noqa: E402

__all__ = ["run_loss_cases", "CASES"]

B, T, V = 2, 32, 48


def _litgpt(logits, labels):
    return litgpt_chunked_cross_entropy(logits, labels, chunk_size=16)


def _litgpt_across_rows(logits, labels):
    return litgpt_chunked_cross_entropy(logits, labels, chunk_size=24)     # 64 = 24 + 24 + 16: chunks span rows


def _litgpt_finetune(logits, labels):
    """litgpt's finetune step: the LM head's chunks, the last one shifted, targets shifted alike."""
    logits[-1] = logits[-1][..., :-1, :]
    return litgpt_chunked_cross_entropy(logits, labels[..., 1:], chunk_size=128)


def _torchtune(logits, labels):
    return TorchtuneChunkedCE(num_output_chunks=4)(logits, labels)


# name -> (TinyLM options, loss, where the loss runs, schedule): "step" compiled with the model in one
# frame, "disabled" in a torch.compiler.disable'd function inside it, "eager" after the compiled
# model returns (litgpt's and torchtune's recipes compile the model and call the loss eagerly)
_BASE = {
    "litgpt-flat-split": ({}, _litgpt, "zigzag"),
    "litgpt-flat-split-across-rows": ({}, _litgpt_across_rows, "zigzag"),
    "litgpt-flat-split-across-rows-striped": ({}, _litgpt_across_rows, "striped"),
    "litgpt-head-chunks": ({"head_chunks": 4, "chunk_with": "split"}, _litgpt, "zigzag"),
    "litgpt-finetune-shifted-head-chunks": ({"head_chunks": 4, "chunk_with": "split"}, _litgpt_finetune, "zigzag"),
    "torchtune-chunked-output": ({"head_chunks": 4, "chunk_with": "chunk"}, _torchtune, "zigzag"),
}
CASES = {name: (options, loss, "step", schedule) for name, (options, loss, schedule) in _BASE.items()}
CASES.update({f"{name}-eager": (options, loss, "eager", schedule) for name, (options, loss, schedule) in _BASE.items()})
CASES["torchtune-chunked-output-disabled"] = (*_BASE["torchtune-chunked-output"][:2], "disabled", "zigzag")


class _Step(torch.nn.Module):
    def __init__(self, model, loss, disabled: bool):
        super().__init__()
        self.model, self.loss = model, (torch.compiler.disable(loss) if disabled else loss)

    def forward(self, ids, labels):
        return self.loss(self.model(ids), labels)


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def _case(options: dict, loss, where: str, schedule: str) -> dict:
    from seqpar_compiler.runtime.sequence_shard import gather_count
    torch.manual_seed(0)
    model, ref = TinyLM(**options).double(), TinyLM(**options).double()
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = -100                                   # ignored targets: the count is global
    torch._dynamo.reset()
    backend = sp.backend(inner="aot_eager", schedule=schedule)
    if where == "eager":
        compiled = torch.compile(model, backend=backend)

        def step(ids, labels):
            return loss(compiled(ids), labels)
    else:
        step = torch.compile(_Step(model, loss, where == "disabled"), backend=backend)
    before = gather_count()
    with warnings.catch_warnings(record=True) as caught, sp.stats() as st:
        warnings.simplefilter("always")
        out = step(ids, labels)
        out.backward()
    gathers = gather_count() - before
    ref_out = _Step(ref, loss, False)(ids, labels)
    ref_out.backward()
    grads = {n: _rel(p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())}
    return {"loss": _rel(out, ref_out), "grads": grads, "gathers": gathers,
            "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)],
            "ring_calls": st.attention_forward_calls}


def run_loss_cases(rank: int, P: int, names: list[str]) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = _case(*CASES[name])
        except Exception as err:  # noqa: BLE001 - reported per case
            import traceback
            out[name] = {"error": f"{type(err).__name__}: {err}", "tb": traceback.format_exc()[-2000:]}
    return out
