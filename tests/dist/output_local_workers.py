"""``SEQPAR_OUTPUT=local`` and frames, on spawned ranks (issue 13: one clear meaning).

``local``: each compiled frame's sequence outputs are this rank's plain shards, for a model
compiled as one frame. Passing such a shard into another compiled frame is refused with an
error naming the fix; across frames the default ``gather`` mode's SequenceShards carry the
sequence, and ``x.to_local()`` is this rank's shard without communication.
"""
from __future__ import annotations

import torch

import frames_workers as FW
import seqpar_compiler as sp

__all__ = ["local_case", "run_cases"]


def local_case(rank, P, *, arrangement, output):
    idx, tgt = FW._batch()
    torch._dynamo.reset()
    backend = sp.backend(inner="aot_eager", schedule="zigzag", output=output)
    if arrangement == "ddp":                 # DDP over this rank alone: DDPOptimizer still splits the graph
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        own = [dist.new_group([r]) for r in range(P)][rank]
        torch._dynamo.config.optimize_ddp = True
        dist._DEFAULT_FIRST_BUCKET_BYTES = 8 * 1024       # small buckets: several pieces (as ddp_workers)
        torch.manual_seed(0)
        m = FW.MODELS["gpt"]()
        call = torch.compile(DDP(m, process_group=own, bucket_cap_mb=0.02), backend=backend)
    else:
        call, m, ref = FW._prepare("gpt", arrangement, backend)
    try:
        call(idx, tgt)                                  # compiles (its agreement checks gather)
        with FW.GatherCounter() as gathers:
            logits, loss = call(idx, tgt)
            local = logits.to_local() if output == "gather" else logits
            n_gathers = gathers.calls
    except Exception as e:  # noqa: BLE001 - the refused cases report the error's type and message
        return {"error": f"{type(e).__name__}: {e}"}
    r_logits, _ = ref(idx, tgt)
    want = sp.shard_sequence(r_logits.detach(), 1, schedule="zigzag")
    return {"error": None, "type": type(local).__name__, "local_rel": FW._rel(local, want),
            "local_shape": tuple(local.shape), "gathers": n_gathers}


def run_cases(rank, P, cases):
    return {name: local_case(rank, P, **kw) for name, kw in cases}
