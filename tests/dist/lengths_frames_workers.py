"""Many sequence lengths through models whose sequence crosses frames, on spawned ranks (issue 13,
"Lengths").

A graph break or a per-block compile hands the next frame a ``SequenceShard`` (and a transformers
mask a ``ProvedMask``); their flatten contexts leave the length out, so Dynamo traces each frame
once with a symbolic length and seqpar specialises per length inside it
(``seqpar_compiler/symbolic_lengths.py``). Each case trains one step per length and returns, per
length, the relative errors of the loss and of every parameter gradient against single-process
eager, this rank's ring-forward count, and Dynamo's frame compiles so far; in all, the seqpar and
recompile warnings. One spawn runs every case.
"""
from __future__ import annotations

import warnings

import torch

import dynamic_length_workers as DL
import frames_workers as FW
import seqpar_compiler as sp

__all__ = ["frames_lengths_case", "hf_lengths_case", "run_cases"]


def _counting(backend):
    """``backend`` with a count of the frames Dynamo hands it (one per Dynamo compile)."""
    counter = torch._dynamo.testing.CompileCounter()

    def counting(gm, example_inputs):
        counter(gm, example_inputs)
        return backend(gm, example_inputs)
    return counting, counter


def _warnings(caught) -> list[str]:
    return [str(w.message)[:300] for w in caught if "seqpar" in str(w.message) or "recompile" in str(w.message)]


def frames_lengths_case(rank, P, *, model, arrangement, lengths, dynamic=None, B=2):
    """``model`` from frames_workers compiled as ``arrangement`` ("graph-break" or "per-block"),
    one training step per length; ``dynamic=None`` is Dynamo's automatic dynamic shapes."""
    torch._dynamo.reset()
    backend, counter = _counting(sp.backend(inner="aot_eager", schedule="zigzag"))
    torch.manual_seed(0)
    m, ref = FW.MODELS[model](), FW.MODELS[model]()
    ref.load_state_dict(m.state_dict())
    if arrangement == "graph-break":
        m.blocks = torch.nn.ModuleList(FW.BreakAfter(b) for b in m.blocks)
        call = torch.compile(m, backend=backend, dynamic=dynamic)
    elif arrangement in ("per-block", "fsdp-per-block"):
        for i, b in enumerate(m.blocks):
            m.blocks[i] = torch.compile(b, backend=backend, dynamic=dynamic)
        if arrangement == "fsdp-per-block":      # FSDP2 over the sequence group's ranks (frames_workers)
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
            for b in m.blocks:
                fully_shard(b, mesh=mesh)
            fully_shard(m, mesh=mesh)
        call = m
    else:
        raise ValueError(f"arrangement must be 'graph-break', 'per-block' or 'fsdp-per-block'; got {arrangement!r}")
    per_length, caught = DL.train_per_length(
        lengths, m, ref, lambda S: DL._ids_and_targets(S, B), lambda batch: call(*batch)[1],
        lambda batch: ref(*batch)[1], counter, FW._grad)
    return {"lengths": per_length, "layers": len(m.blocks), "warnings": _warnings(caught)}


def reported_case(rank, P, **kw):
    """A frames case whose exception is reported (its first line), or None when it ran: the test
    asserts None, and the other cases of the spawn still run if it raises."""
    try:
        frames_lengths_case(rank, P, **kw)
        return {"error": None}
    except Exception as e:                               # noqa: BLE001 -- reported to the test
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def hf_lengths_case(rank, P, *, lengths, dynamic=True, B=2):
    """/tmp/gb_len.py of issue 13: an HF Llama whose first decoder layer ends with a graph break
    (the mask crosses the break as a ProvedMask), one training step per length."""
    import transformers
    torch._dynamo.reset()
    backend, counter = _counting(sp.backend(inner="aot_eager", schedule="zigzag"))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   attn_implementation="sdpa")
    m, ref = transformers.LlamaForCausalLM(cfg), transformers.LlamaForCausalLM(cfg)
    ref.load_state_dict(m.state_dict())
    m.model.layers[0].register_forward_hook(lambda *a: torch._dynamo.graph_break())
    call = torch.compile(m, backend=backend, dynamic=dynamic)
    per_length, caught = DL.train_per_length(
        lengths, m, ref, lambda S: torch.randint(0, 128, (B, S), generator=torch.Generator().manual_seed(S)),
        lambda idx: call(idx, labels=idx, use_cache=False).loss, lambda idx: ref(idx, labels=idx, use_cache=False).loss,
        counter)
    return {"lengths": per_length, "layers": cfg.num_hidden_layers, "warnings": _warnings(caught)}


def run_cases(rank, P, cases):
    fns = {"frames": frames_lengths_case, "hf": hf_lengths_case, "reported": reported_case}
    return {name: fns[kind](rank, P, **kw) for name, kind, kw in cases}
