"""Data parallelism around the sequence groups, on spawned ranks (issue 13 follow-up).

Arrangements (``world`` ranks, sequence groups of ``degree`` consecutive ranks, dp = world/degree
data-parallel replicas; sequence group k trains on batch k):

  * ``ddp``: DDP over the data-parallel groups (ranks r, r+degree, …), whole model compiled,
    ``optimize_ddp`` on with a tiny ``bucket_cap_mb`` so DDPOptimizer splits the graph into
    several pieces (each compiled on fake tensors; pieces hand each other SequenceShards).
  * ``ddp-world``: DDP over every rank (dp × sp), for ``grad_reduce="none"``.
  * ``fsdp-per-block`` / ``fsdp-whole``: FSDP2 over every rank (the same ranks as the sequence
    group when dp = 1; torchtitan's flattened dp_shard × cp otherwise).
  * ``mesh-fsdp``: a named 2-D DeviceMesh ``("sp", "dp")``, so the sequence groups are the
    mesh's columns (ranks {0, 2}, {1, 3}), not SEQPAR_DEGREE's consecutive ranks (those hold
    different batches: a wrong group fails the same-batch check); seqpar takes its group from
    ``backend(mesh=world_mesh, mesh_dim="sp")``, FSDP2 spans ``world_mesh["dp"]``.
    ``mesh-fsdp-2d``: FSDP2 over the flattened ``dp × sp`` mesh instead (torchtitan).

Every measured backward runs under a dispatch mode that counts the all-reduces (seqpar's
gradient sums, compiled or eager) and reduce-scatters (FSDP's) it issues: "reduced once" is
0 all-reduces under ``grad_reduce="none"``.

The reference is single-process eager on every group's batch with the data-parallel mean:
loss = mean over k of loss_k, so the single-device gradient is the mean of the groups' gradients.
The loss scaling rule under ``grad_reduce="none"`` (README): the wrapper's reduction must sum over
the sequence ranks and average over the dp replicas; DDP and FSDP2 divide by the ranks they span
(dp·sp), so multiply the loss by sp. FSDP2's ``set_gradient_divide_factor(dp)`` with
``set_force_sum_reduction_for_comms(True)`` (a SUM then a divide: gloo has no PREMUL_SUM) does the
same without touching the loss (``divide_factor=True``).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import frames_workers as FW
import seqpar_compiler as sp

__all__ = ["CollectiveCounter", "ddp_case", "eager_gather_warning_case", "mesh_errors_case", "run_cases"]


class CollectiveCounter(TorchDispatchMode):
    """Counts the all-reduces and reduce-scatters dispatched inside the block: functional
    collectives of compiled graphs, ``c10d`` ops of eager code and of FSDP2's reduction."""

    def __init__(self):
        super().__init__()
        self.all_reduces = self.reduce_scatters = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.all_reduces += "all_reduce" in name or "allreduce" in name
        self.reduce_scatters += "reduce_scatter" in name
        return func(*args, **(kwargs or {}))


class WithGain(nn.Module):
    """A model whose returned loss has a term computed from a parameter alone (``gain ** 2``):
    under ``none`` that term's gradient must come out partial like the rest."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.gain = inner, nn.Parameter(torch.tensor([0.5]))          # 1-D: FSDP2 shards no scalars

    @property
    def blocks(self):
        return self.inner.blocks

    def forward(self, idx, targets):
        logits, loss = self.inner(idx, targets)
        return logits, loss + (self.gain ** 2).sum()


MODELS = {**FW.MODELS, "gpt-gain": lambda: WithGain(FW.MODELS["gpt"]()),
          # hand-written attention (softmax(q kᵀ + mask) v): DDPOptimizer's pieces take its length too
          "gpt-manual": lambda: FW.GPT(FW.GPTConfig(n_layer=2, attention="manual"))}


def _batch(k: int, vocab: int = 256):
    g = torch.Generator().manual_seed(1 + k)
    return (torch.randint(0, vocab, (FW.B, FW.S), generator=g), torch.randint(0, vocab, (FW.B, FW.S), generator=g))


def _dp_groups(world: int, degree: int):
    """DDP's groups: one rank of each sequence group, same position (every rank makes every group)."""
    groups = [dist.new_group([k * degree + i for k in range(world // degree)]) for i in range(degree)]
    return groups[dist.get_rank() % degree]


def _wrap(m: nn.Module, arrangement: str, backend, world: int, degree: int, grad_reduce: str, world_mesh=None,
          divide_factor: bool = False):
    if arrangement.startswith("mesh-fsdp"):     # FSDP2 over the named mesh's dp dim, or (torchtitan's
        from torch.distributed.fsdp import fully_shard      # 2-D) over its flattened dp × sp ranks
        fsdp_mesh = world_mesh["dp"] if arrangement == "mesh-fsdp" else world_mesh._flatten("dp_sp")
        for i, b in enumerate(m.blocks):
            m.blocks[i] = torch.compile(b, backend=backend)
            fully_shard(m.blocks[i], mesh=fsdp_mesh)
        fully_shard(m, mesh=fsdp_mesh)
        return m
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
    if divide_factor:             # FSDP sums over dp·sp ranks and divides by dp only
        for module in [*m.blocks, m]:
            module.set_gradient_divide_factor(float(world // degree))
            module.set_force_sum_reduction_for_comms(True)
    return torch.compile(m, backend=backend) if arrangement == "fsdp-whole" else m


def ddp_case(rank, world, *, model="gpt", arrangement="ddp", degree=2, grad_reduce="sum", inner="aot_eager",
             divide_factor=False):
    """One training step under ``arrangement`` against single-process eager with the dp mean."""
    from seqpar_compiler import fsdp_reduction
    torch._dynamo.reset()
    fsdp_reduction._warned_groups.clear()           # said once per group and process: once per case here
    pieces, world_mesh, k = [], None, rank // degree          # k: this rank's batch (its dp index)
    if arrangement.startswith("mesh-"):
        from torch.distributed.device_mesh import init_device_mesh
        world_mesh = init_device_mesh("cpu", (degree, world // degree), mesh_dim_names=("sp", "dp"))
        k = world_mesh.get_local_rank("dp")
        inner_backend = sp.backend(mesh=world_mesh, mesh_dim="sp", inner=inner, grad_reduce=grad_reduce,
                                   schedule="zigzag")
    else:
        inner_backend = sp.backend(inner=inner, degree=degree, grad_reduce=grad_reduce, schedule="zigzag")

    def backend(gm, example_inputs):            # counts the frames/pieces the backend compiles
        pieces.append(len(list(gm.graph.nodes)))
        return inner_backend(gm, example_inputs)
    torch.manual_seed(0)
    m, ref = MODELS[model](), MODELS[model]()
    ref.load_state_dict(m.state_dict())
    call = _wrap(m, arrangement, backend, world, degree, grad_reduce, world_mesh, divide_factor)
    idx, tgt = _batch(k)
    # the loss scaling rule under "none": the wrapper averages over dp·sp ranks, the partial
    # gradients need a sum over sp: loss × sp, unless FSDP divides by dp only (divide_factor)
    scale = degree if grad_reduce == "none" and arrangement != "per-block" and not divide_factor else 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (call(idx, tgt)[1] * scale).backward()                # warm-up: compiles every piece
        m.zero_grad()
        compiled_pieces = len(pieces)
        with sp.stats() as st, FW.GatherCounter() as gathers:
            saves, (logits, loss) = FW.full_length_saves(lambda: call(idx, tgt), [idx, tgt])
            with CollectiveCounter() as backward_collectives:
                (loss * scale).backward()
            gathers_in_step = gathers.calls
    r_loss, own_k = 0, k
    for k in range(world // degree):
        r_idx, r_tgt = _batch(k)
        r_logits_k, r_loss_k = ref(r_idx, r_tgt)
        r_loss = r_loss + r_loss_k / (world // degree)
        if k == own_k:
            own_logits, own_loss = r_logits_k, r_loss_k
    r_loss.backward()
    grads = {n: FW._rel(FW._grad(p), q.grad) for (n, p), q in zip(m.named_parameters(), ref.parameters())}
    raw = ({n.replace("._orig_mod", ""): p.grad.detach().clone() for n, p in m.named_parameters()}
           if arrangement == "per-block" else None)
    ref_grads = {n: q.grad.detach().clone() for n, q in ref.named_parameters()} if raw is not None else None
    return {"raw": raw, "ref": ref_grads, "loss": FW._rel(loss, own_loss), "logits": FW._rel(logits, own_logits), "grads": grads,
            "pieces": compiled_pieces, "ring_calls": st.attention_forward_calls, "layers": len(m.blocks),
            "full_saves": saves, "gathers": gathers_in_step, "logits_type": type(logits).__name__,
            "warnings": [str(w.message)[:800] for w in caught if "seqpar" in str(w.message)],
            "backward_all_reduces": backward_collectives.all_reduces,
            "backward_reduce_scatters": backward_collectives.reduce_scatters}


def mesh_errors_case(rank, world):
    """What ``backend(mesh=...)`` says to wrong arguments (the message of each, or None)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    world_mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "sp"))
    other = DeviceMesh("cpu", [0, 1], mesh_dim_names=("sp",))       # ranks 2, 3 are not in it

    def message(**kw):
        try:
            sp.backend(**kw)
        except (ValueError, TypeError) as e:
            return str(e)
        return None
    return {"wrong_dim": message(mesh=world_mesh, mesh_dim="cp"), "no_dim": message(mesh=world_mesh),
            "both": message(mesh=world_mesh["sp"], group=dist.group.WORLD), "not_in_mesh": message(mesh=other),
            "dim_without_mesh": message(mesh_dim="sp"), "not_a_mesh": message(mesh=[0, 1]),
            "sub_mesh_ok": message(mesh=world_mesh["sp"]) is None and message(mesh=world_mesh, mesh_dim=1) is None}


def eager_gather_warning_case(rank, world):
    """An eager op with no sequence-parallel rule on a SequenceShard, called twice: the gather
    warnings each rank saw."""
    from seqpar_compiler.runtime.sequence_shard import SequenceShard, ShardSpec, slice_local
    spec = ShardSpec(1, FW.S, "zigzag", dist.group.WORLD.group_name)
    full = torch.arange(2 * FW.S, dtype=torch.float32).view(2, FW.S)
    shard = SequenceShard(slice_local(full, spec), spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = [torch.fft.rfft(shard, dim=1), torch.fft.rfft(shard, dim=1)]
    exact = all(float((FW.full_tensor(o) - torch.fft.rfft(full, dim=1)).abs().max()) == 0 for o in out)
    return {"exact": exact, "warnings": [str(w.message) for w in caught if "eager op" in str(w.message)]}


def run_cases(rank, world, cases):
    kinds = {"mesh-errors": mesh_errors_case, "eager-gather-warning": eager_gather_warning_case}
    return {name: kinds[name](rank, world) if name in kinds else ddp_case(rank, world, **kw) for name, kw in cases}
