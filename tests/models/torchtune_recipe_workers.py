"""One training step of a real torchtune model the way its recipes compile it, on each spawned
rank, against the same step eagerly in this process.

torchtune's recipes do not compile the whole model: ``training.compile_model`` compiles each
transformer layer on its own and ``training.compile_loss`` compiles the chunked loss's
per-chunk cross entropy, both with the backend named by ``TORCH_COMPILE_BACKEND``. So every
layer after the first receives the sequence as a SequenceShard and the embedding, the final norm
and the chunked output projection run eagerly between frames.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))        # tests/step_probes.py

__all__ = ["build", "batch", "recipe_step"]

LAYERS = 2


def build() -> torch.nn.Module:
    """A tiny Llama 3.2 from torchtune's own builder (GQA: 4 query heads over 2 KV heads)."""
    from torchtune.models.llama3_2 import llama3_2
    torch.manual_seed(0)
    return llama3_2(vocab_size=128, num_layers=LAYERS, num_heads=4, num_kv_heads=2, embed_dim=64,
                    max_seq_len=256, intermediate_dim=128, tie_word_embeddings=False)


def batch(S: int = 64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, S), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100                       # the recipe's shifted labels, the last one ignored
    labels[1, :5] = -100                       # a prompt masked out of the loss
    return ids, labels


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def recipe_step(rank: int, P: int, _=None) -> dict:
    """Compile as the recipe does, run one forward + backward, compare with eager."""
    import seqpar_compiler as sp
    from step_probes import SequenceGatherCounter, grad_errors
    from torchtune import training
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    model, ref = build(), build()
    ref.load_state_dict(model.state_dict())
    loss_fn, ref_loss_fn = CEWithChunkedOutputLoss(), CEWithChunkedOutputLoss()
    for m in (model, ref):
        m.set_num_output_chunks(loss_fn.num_output_chunks)
    training.compile_model(model, verbose=False)          # each layer, TORCH_COMPILE_BACKEND
    training.compile_loss(loss_fn, verbose=False)
    ids, labels = batch()
    with warnings.catch_warnings(record=True) as caught, sp.stats() as st, SequenceGatherCounter() as gathers:
        warnings.simplefilter("always")
        loss = loss_fn(model(ids), labels)
        loss.backward()
    ref_loss = ref_loss_fn(ref(ids), labels)
    ref_loss.backward()
    grads, missing = grad_errors(model, ref)
    return {"loss": _rel(loss, ref_loss), "grads": grads, "missing": missing, "ring_calls": st.attention_forward_calls,
            "gathers": gathers.calls, "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)]}
