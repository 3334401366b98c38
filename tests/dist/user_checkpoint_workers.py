"""Training steps with the user's own activation checkpointing on spawned ranks (issue 13).

Each case returns what the tests check: relative errors of the loss and of every parameter
gradient against single-process eager, this rank's ring-forward count, the saved-for-backward
tensors that hold the whole sequence (``saved_tensors_hooks``), and the sequence all-gathers of
the step. One spawn runs every case.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))        # tests/step_probes.py

import seqpar_compiler as sp  # noqa: E402
from models import GPT, GPTConfig, Llama, LlamaConfig  # noqa: E402
from step_probes import SequenceGatherCounter, full_length_saves  # noqa: E402

S = 48          # no model dim is 48, so a tensor with a dim of 48 holds the whole sequence
B = 3           # B·S/P (a merged batch × local-sequence dim) is never S for P = 2 or 4
MODELS = {"gpt": lambda: GPT(GPTConfig(n_layer=2)), "llama": lambda: Llama(LlamaConfig(n_layer=2))}
_SDPA = [getattr(torch.ops.aten, n).default for n in
         ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
          "_scaled_dot_product_flash_attention_for_cpu") if hasattr(torch.ops.aten, n)]


def _save_attention(ctx, func, *args, **kwargs):
    """A torchtitan-style selective policy: keep attention (it names ATen's SDPA ops only)."""
    return CheckpointPolicy.MUST_SAVE if func in _SDPA else CheckpointPolicy.PREFER_RECOMPUTE


class CheckpointedBlock(nn.Module):
    """The user's ``checkpoint(block, *args, use_reentrant=False)`` around one block."""

    def __init__(self, block: nn.Module, selective: bool):
        super().__init__()
        self.block, self.selective = block, selective

    def forward(self, *args):
        if self.selective:
            ctx = functools.partial(create_selective_checkpoint_contexts, _save_attention)
            return checkpoint(self.block, *args, use_reentrant=False, context_fn=ctx)
        return checkpoint(self.block, *args, use_reentrant=False)


def _wrap(model: nn.Module, selective: bool | None) -> nn.Module:
    if selective is None:         # the same step without the user's checkpointing
        return model
    model.blocks = nn.ModuleList(CheckpointedBlock(b, selective) for b in model.blocks)
    return model


def _batch(vocab=256):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (B, S), generator=g), torch.randint(0, vocab, (B, S), generator=g)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


class _AllReduceCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts functional all-reduces run while active (the loss's, the gradient buckets')."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "all_reduce" in str(func):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _hf_model(grad_ckpt: bool):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   attn_implementation="sdpa")
    m = transformers.LlamaForCausalLM(cfg)
    if grad_ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    return m


def user_checkpoint_case(rank, P, *, model="gpt", selective=False, checkpoint_policy="remat-aware",
                         inner="aot_eager", hf=False, hf_checkpointing=True):
    """One training step of a model whose blocks the user checkpoints, through seqpar."""
    torch.manual_seed(0)
    if hf:
        m, ref = _hf_model(hf_checkpointing), _hf_model(False)
        ref.load_state_dict(m.state_dict())
        idx, _ = _batch(128)
        layers = 2

        # explicit position ids: without them and without a cache (gradient checkpointing turns
        # the cache off) transformers detects packing with torch.diff, which has no rule yet
        pos = torch.arange(S).expand(B, S)

        def call(mod):
            return mod(idx, labels=idx, use_cache=False, position_ids=pos).loss
    else:
        m = _wrap(MODELS[model](), selective)
        torch.manual_seed(0)
        ref = MODELS[model]()
        idx, tgt = _batch()
        layers = len(m.blocks)

        def call(mod):
            return mod(idx, tgt)[1]
    torch._dynamo.reset()
    cm = torch.compile(m, backend=sp.backend(inner=inner, schedule="zigzag", checkpoint=checkpoint_policy))
    with warnings.catch_warnings(record=True) as caught, sp.stats() as st, SequenceGatherCounter() as gathers:
        warnings.simplefilter("always")
        saves, loss = full_length_saves(lambda: call(cm), [idx], S)
        with _AllReduceCounter() as reduces:
            loss.backward()
    ref_loss = call(ref)
    ref_loss.backward()
    ref_grads = dict(ref.named_parameters())
    grads = {}
    for name, p in m.named_parameters():
        q = ref_grads[name.replace(".block.", ".")]
        grads[name] = _rel(p.grad, q.grad) if q.grad is not None else (0.0 if p.grad is None else 1.0)
    return {"loss": _rel(loss.detach(), ref_loss.detach()), "grads": grads, "layers": layers,
            "ring_forward": st.attention_forward_calls, "ring_backward": st.attention_backward_calls,
            "full_saves": saves, "gathers": gathers.calls, "backward_all_reduces": reduces.calls,
            "parameters": len(list(m.parameters())),
            "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)]}


def run_cases(rank, P, cases):
    fns = {"ckpt": user_checkpoint_case}
    return {name: fns[kind](rank, P, **kw) for name, kind, kw in cases}


class _Blocks(nn.Module):
    """Two GPT blocks on hidden states: a frame whose input requires grad (torchtitan-style
    per-block compile hands one frame the previous frame's activations)."""

    def __init__(self):
        super().__init__()
        from models import GPTBlock
        self.blocks = nn.ModuleList(GPTBlock(GPTConfig(n_layer=2)) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.pow(2).mean()


def grad_reduce_none_case(rank, P, *, inner="aot_eager"):
    """GRAD_REDUCE=none: every gradient leaves the backward partial, the input's too; returns
    this rank's raw gradients and the eager ones, for the test to sum over ranks."""
    torch.manual_seed(0)
    m = _Blocks()
    torch.manual_seed(0)
    ref = _Blocks()
    x = torch.randn(B, S, 64, generator=torch.Generator().manual_seed(2))
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch._dynamo.reset()
    cm = torch.compile(m, backend=sp.backend(inner=inner, schedule="zigzag", grad_reduce="none"))
    loss = cm(xs)
    loss.backward()
    ref_loss = ref(xr)
    ref_loss.backward()
    return {"loss": _rel(loss.detach(), ref_loss.detach()),
            "grads": {"input": xs.grad.clone(), **{n: p.grad.clone() for n, p in m.named_parameters()}},
            "ref": {"input": xr.grad.clone(), **{n: p.grad.clone() for n, p in ref.named_parameters()}}}


def run_none_cases(rank, P, cases):
    return {name: grad_reduce_none_case(rank, P, **kw) for name, kw in cases}
