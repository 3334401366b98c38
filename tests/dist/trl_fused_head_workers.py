"""TRL's fused LM head (``ChunkedLogProbFunction``) on sequence shards, on each spawned rank:
called the way ``add_fused_lm_head`` calls it (hidden ``[N, H]`` merged batch × sequence, the
targets ``[N]``), on a whole shard and on a part (``hidden[:, :-1]``), against the same call on
the full float32 tensors in this process."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

__all__ = ["fused_head_cases"]

B, S, H, V = 2, 32, 16, 40


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def fused_head_cases(rank: int, P: int) -> dict:
    from trl.trainer import utils

    from seqpar_compiler.runtime.sequence_shard import (SequenceShard, ShardSpec, from_local, full_tensor,
                                                        gather_count, slice_local)
    from seqpar_compiler.trl_fused_head import fused_head_on_shards
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, S, H, generator=g)
    weight, bias = torch.randn(V, H, generator=g) * 0.3, torch.randn(V, generator=g) * 0.1
    labels = torch.randint(0, V, (B, S), generator=g)
    out = {}
    for name, cut in (("whole", slice(None)), ("part", slice(None, -1))):
        def call(h, w, b, fn):
            x = h[:, cut]
            t = labels[:, cut].reshape(-1)
            return fn.apply(x.reshape(-1, H), w, b, t, 0.7, 16, 30.0, 1.0, ("entropy", "is_top1"))
        href, wref, bref = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        ref = call(href, wref, bref, utils._ChunkedLogProbFunction)
        (ref[0].sum() + 0.5 * ref[1].sum()).backward()
        spec = ShardSpec(1, S, "zigzag", dist.group.WORLD.group_name)
        local = slice_local(hidden, spec).requires_grad_()
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        before = gather_count()
        with warnings.catch_warnings(record=True) as said, fused_head_on_shards():
            warnings.simplefilter("always")
            got = call(from_local(local, spec), w, b, utils._ChunkedLogProbFunction)
            sharded = all(isinstance(o, SequenceShard) for o in (got[0], got[1], got[4]))
            (got[0].sum() + 0.5 * got[1].sum()).backward()
        out[name] = {
            "log_probs": _rel(full_tensor(got[0]), ref[0]), "entropy": _rel(full_tensor(got[1]), ref[1]),
            "is_top1": bool(torch.equal(full_tensor(got[4]), ref[4])),
            "grad_hidden": _rel(local.grad, slice_local(href.grad, spec)),
            "grad_weight": _rel(w.grad, wref.grad), "grad_bias": _rel(b.grad, bref.grad),
            "sharded": sharded, "gathers": gather_count() - before - 3,        # the 3 full_tensor reads
            "warned": [str(m.message) for m in said if "seqpar" in str(m.message)]}
    return out
