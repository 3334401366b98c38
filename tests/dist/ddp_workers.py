"""Data parallelism around the sequence groups, on spawned ranks (issue 13 follow-up).

Arrangements (``world`` ranks, sequence groups of ``degree`` consecutive ranks, dp = world/degree
data-parallel replicas; sequence group k trains on batch k):

  * ``ddp``: DDP over the data-parallel groups (ranks r, r+degree, …), whole model compiled,
    ``optimize_ddp`` on with a tiny ``bucket_cap_mb`` so DDPOptimizer splits the graph into
    several pieces (each compiled on fake tensors; pieces hand each other SequenceShards).
  * ``ddp-world``: DDP over every rank (dp × sp), for ``grad_reduce="none"``.
  * ``fsdp-per-block`` / ``fsdp-whole``: FSDP2 over every rank (the same ranks as the sequence
    group when dp = 1; torchtitan's flattened dp_shard × cp otherwise).

The reference is single-process eager on every group's batch with the data-parallel mean:
loss = mean over k of loss_k, so the single-device gradient is the mean of the groups' gradients.
The loss scaling rule under ``grad_reduce="none"`` (README): the wrapper's reduction must sum over
the sequence ranks and average over the dp replicas; DDP and FSDP2 divide by the ranks they span
(dp·sp), so multiply the loss by sp (on NCCL, FSDP2's ``set_gradient_divide_factor(dp)`` does the same).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

import frames_workers as FW
import seqpar_compiler as sp

__all__ = ["ddp_case", "run_cases"]


def _batch(k: int, vocab: int = 256):
    g = torch.Generator().manual_seed(1 + k)
    return (torch.randint(0, vocab, (FW.B, FW.S), generator=g), torch.randint(0, vocab, (FW.B, FW.S), generator=g))


def _dp_groups(world: int, degree: int):
    """DDP's groups: one rank of each sequence group, same position (every rank makes every group)."""
    groups = [dist.new_group([k * degree + i for k in range(world // degree)]) for i in range(degree)]
    return groups[dist.get_rank() % degree]


def _wrap(m: nn.Module, arrangement: str, backend, world: int, degree: int, grad_reduce: str):
    if arrangement == "per-block":                 # no wrapper: the raw gradients each rank leaves
        for i, b in enumerate(m.blocks):
            m.blocks[i] = torch.compile(b, backend=backend)
        return m
    if arrangement in ("ddp", "ddp-world"):
        from torch.nn.parallel import DistributedDataParallel as DDP
        pg = _dp_groups(world, degree) if arrangement == "ddp" else None
        torch._dynamo.config.optimize_ddp = True
        # DDP's and DDPOptimizer's first bucket (1 MiB) would hold this small model whole: shrink it
        # as a big model's layers would overflow it, so the graph splits into several pieces
        dist._DEFAULT_FIRST_BUCKET_BYTES = 8 * 1024
        ddp = DDP(m, process_group=pg, bucket_cap_mb=0.02)          # ~20 KB: several buckets, several pieces
        return torch.compile(ddp, backend=backend)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    for i, b in enumerate(m.blocks):
        if arrangement == "fsdp-per-block":
            b = m.blocks[i] = torch.compile(b, backend=backend)
        fully_shard(b, mesh=mesh)
    fully_shard(m, mesh=mesh)
    return torch.compile(m, backend=backend) if arrangement == "fsdp-whole" else m


def ddp_case(rank, world, *, model="gpt", arrangement="ddp", degree=2, grad_reduce="sum", inner="aot_eager"):
    """One training step under ``arrangement`` against single-process eager with the dp mean."""
    torch._dynamo.reset()
    pieces = []
    inner_backend = sp.backend(inner=inner, degree=degree, grad_reduce=grad_reduce, schedule="zigzag")

    def backend(gm, example_inputs):            # counts the frames/pieces the backend compiles
        pieces.append(len(list(gm.graph.nodes)))
        return inner_backend(gm, example_inputs)
    torch.manual_seed(0)
    m, ref = FW.MODELS[model](), FW.MODELS[model]()
    ref.load_state_dict(m.state_dict())
    call = _wrap(m, arrangement, backend, world, degree, grad_reduce)
    idx, tgt = _batch(rank // degree)
    # the loss scaling rule under "none": the wrapper averages over dp·sp ranks, the partial
    # gradients need a sum over sp: loss × sp (set_gradient_divide_factor(dp) needs PREMUL_SUM: no gloo)
    scale = degree if grad_reduce == "none" and arrangement != "per-block" else 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (call(idx, tgt)[1] * scale).backward()                # warm-up: compiles every piece
        m.zero_grad()
        compiled_pieces = len(pieces)
        with sp.stats() as st, FW.GatherCounter() as gathers:
            saves, (logits, loss) = FW.full_length_saves(lambda: call(idx, tgt), [idx, tgt])
            (loss * scale).backward()
            gathers_in_step = gathers.calls
    r_loss = 0
    for k in range(world // degree):
        r_idx, r_tgt = _batch(k)
        r_logits_k, r_loss_k = ref(r_idx, r_tgt)
        r_loss = r_loss + r_loss_k / (world // degree)
        if k == rank // degree:
            own_logits, own_loss = r_logits_k, r_loss_k
    r_loss.backward()
    grads = {n: FW._rel(FW._grad(p), q.grad) for (n, p), q in zip(m.named_parameters(), ref.parameters())}
    raw = ({n.replace("._orig_mod", ""): p.grad.detach().clone() for n, p in m.named_parameters()}
           if arrangement == "per-block" else None)
    ref_grads = {n: q.grad.detach().clone() for n, q in ref.named_parameters()} if raw is not None else None
    return {"raw": raw, "ref": ref_grads, "loss": FW._rel(loss, own_loss), "logits": FW._rel(logits, own_logits), "grads": grads,
            "pieces": compiled_pieces, "ring_calls": st.attention_forward_calls, "layers": len(m.blocks),
            "full_saves": saves, "gathers": gathers_in_step, "logits_type": type(logits).__name__,
            "warnings": [str(w.message)[:300] for w in caught if "seqpar" in str(w.message)]}


def run_cases(rank, world, cases):
    return {name: ddp_case(rank, world, **kw) for name, kw in cases}
