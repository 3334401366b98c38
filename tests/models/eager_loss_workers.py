"""Losses written eagerly after a model compiled with seqpar, in the forms training code writes
them, on each spawned rank against the same loss in this process (float64): the model's
logits leave the compiled frame as a ``SequenceShard`` and every op of the loss runs on it.

Shape legend: B batch, T sequence, V vocabulary; ``logits`` [B, T, V], ``labels`` [B, T]
(-100 where ignored).
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import seqpar_compiler as sp  # noqa: E402
from chunked_loss_modules import TinyLM  # noqa: E402

__all__ = ["IDIOMS", "run_idioms"]

B, T, V = 2, 32, 48


def _masked_mean(per_token, labels):
    mask = (labels != -100).to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum()


def _hf_shift(labels):
    """transformers' ``ForCausalLMLoss``: labels padded by one and shifted, logits not cut."""
    return F.pad(labels, (0, 1), value=-100)[..., 1:]


# name -> loss(logits, labels); each an idiom of a codebase's training step
IDIOMS = {
    "shift-slice": lambda lg, lab: F.cross_entropy(lg[:, :-1].reshape(-1, V), lab[:, 1:].reshape(-1)),
    "shift-contiguous-view": lambda lg, lab: F.cross_entropy(lg[..., :-1, :].contiguous().view(-1, V),
                                                             lab[..., 1:].contiguous().view(-1)),
    "hf-padded-shift": lambda lg, lab: F.cross_entropy(lg.view(-1, V), _hf_shift(lab).reshape(-1),
                                                       reduction="sum") / (lab[:, 1:] != -100).sum(),
    # classes second ([B, V, T]): x-transformers' and einops-style code (nll_loss2d underneath)
    "classes-second": lambda lg, lab: F.cross_entropy(lg.transpose(1, 2), lab, ignore_index=-100),
    "classes-second-none": lambda lg, lab: _masked_mean(F.cross_entropy(lg.permute(0, 2, 1), lab,
                                                                        reduction="none"), lab),
    "token-logprobs": lambda lg, lab: -_masked_mean(
        lg.log_softmax(-1).gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1), lab),
    "none-then-masked-mean": lambda lg, lab: _masked_mean(
        torch.nn.CrossEntropyLoss(reduction="none")(lg.view(-1, V), lab.view(-1)).view(B, T), lab),
    "label-smoothing": lambda lg, lab: F.cross_entropy(lg.view(-1, V), lab.view(-1), label_smoothing=0.1),
    "class-weighted": lambda lg, lab: F.cross_entropy(lg.view(-1, V), lab.view(-1),
                                                      weight=torch.linspace(0.5, 2.0, V, dtype=lg.dtype)),
    "class-weighted-classes-second": lambda lg, lab: F.cross_entropy(
        lg.transpose(1, 2), lab, weight=torch.linspace(0.5, 2.0, V, dtype=lg.dtype), reduction="sum"),
    "z-loss": lambda lg, lab: F.cross_entropy(lg.flatten(0, 1), lab.flatten()) + 1e-2 * lg.logsumexp(-1).pow(2).mean(),
    "kl-to-a-detached-copy": lambda lg, lab: F.kl_div(F.log_softmax(lg, -1), F.log_softmax(lg.detach() * 0.5, -1),
                                                      log_target=True, reduction="batchmean"),
    # rows picked by a boolean mask (a data-dependent count per rank): token-local rows
    "masked-rows-ce": lambda lg, lab: F.cross_entropy(lg[lab != -100], lab[lab != -100]),
    "masked-rows-logprobs": lambda lg, lab: -lg[lab != -100].log_softmax(-1).gather(
        -1, lab[lab != -100].unsqueeze(-1)).mean(),
    "masked-rows-sum": lambda lg, lab: lg[lab > 10].pow(2).sum(),
    # every row of one sequence kept: the selection's count equals the sequence length
    "masked-rows-all-of-one-row": lambda lg, lab: lg[0][torch.ones(T, dtype=torch.bool)].pow(2).mean(),
    "mean-pooled": lambda lg, lab: lg.mean(dim=1).pow(2).sum(),
    "max-pooled": lambda lg, lab: lg.amax(dim=1).sum() - lg.amin(dim=(1, 2)).sum(),
    "last-token": lambda lg, lab: F.cross_entropy(lg[:, -1], lab[:, -1].clamp(min=0)),
    "one-position": lambda lg, lab: lg[:, 5].pow(2).sum(),
    # a position of a part (generate's logits_to_keep: the LM head on hidden[:, -k:])
    "one-position-of-a-part": lambda lg, lab: lg[:, 7:][:, -1].pow(2).sum() + lg[:, 7:][:, 0].sum(),
}
# idioms that read single positions: only those rows travel (a small gather each, no warning)
ROW_READS = {"last-token": 1, "one-position": 1, "one-position-of-a-part": 2}


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def run_idioms(rank: int, P: int, names: list[str]) -> dict:
    """One compiled model (zigzag), each idiom's loss and backward after it."""
    from seqpar_compiler.runtime.sequence_shard import gather_count
    torch.manual_seed(0)
    model, ref = TinyLM().double(), TinyLM().double()
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = -100
    compiled = torch.compile(model, backend=sp.backend(inner="aot_eager", schedule="zigzag"))
    out = {}
    for name in names:
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        loss_fn = IDIOMS[name]
        before = gather_count()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = loss_fn(compiled(ids), labels)
            loss.backward()
        gathers = gather_count() - before
        ref_loss = loss_fn(ref(ids), labels)
        ref_loss.backward()
        out[name] = {"loss": _rel(loss, ref_loss), "plain": type(loss) is torch.Tensor, "gathers": gathers,
                     "grads": max(_rel(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters())),
                     "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)]}
    return out
