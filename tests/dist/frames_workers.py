"""Training steps whose sequence crosses frame boundaries, on spawned ranks (issue 13, E-frames).

Every case runs one warm-up step (compiles), then a measured step, and returns what the tests
check: relative errors of the loss, the logits and every parameter gradient against
single-process eager, this rank's ring-forward count, the saved-for-backward tensors that hold
the whole sequence (``saved_tensors_hooks``), the sequence all-gathers of the step, and the
seqpar warnings. One spawn runs every case.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))

import seqpar_compiler as sp  # noqa: E402
from models import GPT, GPTConfig, Llama, LlamaConfig  # noqa: E402
from seqpar_compiler.runtime.sequence_shard import SequenceShard, full_tensor  # noqa: E402

S = 48          # no model dim is 48, so a tensor with a dim of 48 holds the whole sequence
B = 3           # B·S/P is not S either (a merged local batch × sequence dim)
MODELS = {"gpt": lambda: GPT(GPTConfig(n_layer=2)), "llama": lambda: Llama(LlamaConfig(n_layer=2)),
          # width == S: the block's input [B, S, S] has two dims of the sequence length
          "llama-width-s": lambda: Llama(LlamaConfig(n_layer=1, n_embd=S, ffn_hidden=2 * S))}


class BreakAfter(nn.Module):
    """``torch._dynamo.graph_break()`` after a block: each block ends a frame."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        out = self.block(*args)
        torch._dynamo.graph_break()
        return out


class BreakBefore(nn.Module):
    """``torch._dynamo.graph_break()`` before a block's attention (transformers' output capturing
    does this in Mixtral): the piece before it, the embedding and the first norm, has no attention."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, *args):
        torch._dynamo.graph_break()
        return self.attn(*args)


def _batch(vocab=256):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (B, S), generator=g), torch.randint(0, vocab, (B, S), generator=g)


def _rel(a, b) -> float:
    a, b = full_tensor(a).detach().double(), b.detach().double()     # reading a shard gathers it
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class GatherCounter:
    """Counts the sequence all-gathers (``dist.all_gather`` is what ``gather_sequence`` calls,
    in compiled frames, in eager fallbacks and in the backward of an entry shard)."""

    def __enter__(self):
        self.calls, self._orig = 0, dist.all_gather

        def counting(*args, **kwargs):
            self.calls += 1
            return self._orig(*args, **kwargs)
        dist.all_gather = counting
        return self

    def __exit__(self, *exc):
        dist.all_gather = self._orig


def full_length_saves(step, inputs):
    """Shapes of tensors saved for the backward during ``step()`` with a dim of the whole
    sequence S (a SequenceShard is judged by its local shard), except the user's inputs."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    found = []

    @torch._dynamo.disable          # the hook runs inside compiled frames' autograd; keep it eager
    def pack(t):
        local = t._local if isinstance(t, SequenceShard) else t
        if local.dtype == torch.int64 and local.dim() == 1:
            return t             # positions the eager root indexes its embeddings with (see the tests)
        if S in local.shape and local.untyped_storage().data_ptr() not in own:
            found.append(tuple(local.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    return found, out


class FullLengthBackward:
    """Records the floating-point tensors of the whole sequence length S that ATen ops make
    while it is on (a SequenceShard by its local shard): run around ``backward()`` it catches a
    gradient gathered to full length (the gather's output) or scattered into full-length zeros.
    With the ``aot_eager`` inner compiler the compiled frames' backward ops are seen too."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        found = self.shapes = []

        class Mode(TorchDispatchMode):
            @classmethod
            def ignore_compile_internals(cls):
                return True

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    local = t._local if isinstance(t, SequenceShard) else t
                    if isinstance(local, torch.Tensor) and local.is_floating_point() and S in local.shape:
                        found.append((str(func), tuple(local.shape)))
                return out
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def _prepare(model: str, arrangement: str, backend):
    """The model under test and its single-device twin; ``arrangement`` says how it is compiled."""
    torch.manual_seed(0)
    m, ref = MODELS[model](), MODELS[model]()
    ref.load_state_dict(m.state_dict())
    if arrangement == "graph-break":
        m.blocks = nn.ModuleList(BreakAfter(b) for b in m.blocks)
        return torch.compile(m, backend=backend), m, ref
    if arrangement == "break-before-attention":
        for b in m.blocks:
            b.attn = BreakBefore(b.attn)
        return torch.compile(m, backend=backend), m, ref
    if arrangement == "per-block":            # torchtitan: blocks compiled one by one, the root eager
        for i, b in enumerate(m.blocks):
            m.blocks[i] = torch.compile(b, backend=backend)
        return m, m, ref
    if arrangement == "whole":
        return torch.compile(m, backend=backend), m, ref
    if arrangement.startswith("fsdp-"):       # FSDP2 over the same ranks as the sequence group
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for i, b in enumerate(m.blocks):
            if arrangement == "fsdp-per-block":
                b = m.blocks[i] = torch.compile(b, backend=backend)
            fully_shard(b, mesh=mesh)
        fully_shard(m, mesh=mesh)
        return (torch.compile(m, backend=backend) if arrangement == "fsdp-whole" else m), m, ref
    raise ValueError(arrangement)


def _grad(p):
    """A parameter's whole gradient (FSDP2 keeps a DTensor shard of it)."""
    g = p.grad
    return g.full_tensor() if hasattr(g, "full_tensor") else g


def frames_case(rank, P, *, model="gpt", arrangement="graph-break", inner="aot_eager", **options):
    """One training step of ``model`` compiled as ``arrangement``, against single-process eager."""
    idx, tgt = _batch()
    torch._dynamo.reset()
    backend = sp.backend(inner=inner, **options)
    call, m, ref = _prepare(model, arrangement, backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(idx, tgt)[1].backward()                      # warm-up: compiles every frame
        m.zero_grad()
        with sp.stats() as st, GatherCounter() as gathers:
            saves, (logits, loss) = full_length_saves(lambda: call(idx, tgt), [idx, tgt])
            with FullLengthBackward() as full_backward:
                loss.backward()
            gathers_in_step = gathers.calls
    r_logits, r_loss = ref(idx, tgt)
    r_loss.backward()
    grads = {n: _rel(_grad(p), q.grad) for (n, p), q in zip(m.named_parameters(), ref.parameters())}
    return {"loss": _rel(loss, r_loss), "logits": _rel(logits, r_logits), "grads": grads,
            "logits_type": type(logits).__name__, "loss_type": type(loss).__name__,
            "ring_calls": st.attention_forward_calls, "layers": len(m.blocks), "full_saves": saves,
            "gathers": gathers_in_step, "full_backward": full_backward.shapes,
            "warnings": [str(w.message)[:300] for w in caught if "seqpar" in str(w.message)]}


def run_cases(rank, P, cases):
    fns = {"frames": frames_case}
    return {name: fns[kind](rank, P, **kw) for name, kind, kw in cases}


def entry_gradient_fallback_case(rank, P, grad_reduce):
    """The entry shard's gradient (a SequenceShard) reaching eager code with no shard rule for it
    (an FFT over the sequence before the frame): gathered and exact, warned, under ``sum``;
    refused under ``none``, where a gathered gradient would be whole instead of partial."""
    from seqpar_compiler.runtime.grad_collectives import shard_entry_activation
    from seqpar_compiler.runtime.sequence_shard import ShardSpec, from_local
    spec = ShardSpec(1, S, "zigzag", dist.group.WORLD.group_name, grad_reduce=grad_reduce)
    w = torch.randn(B, S, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    local = shard_entry_activation(torch.fft.fft(w, dim=1).real, spec)
    loss = from_local(local.pow(2), spec).sum()
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loss.backward()
        except RuntimeError as e:
            error = str(e)
    ref = w.detach().clone().requires_grad_()
    torch.fft.fft(ref, dim=1).real.pow(2).sum().backward()
    return {"error": error, "grad": None if error else _rel(w.grad, ref.grad),
            "warnings": [str(c.message)[:200] for c in caught if "seqpar" in str(c.message)]}


def run_entry_gradient_cases(rank, P, modes):
    return {mode: entry_gradient_fallback_case(rank, P, mode) for mode in modes}
