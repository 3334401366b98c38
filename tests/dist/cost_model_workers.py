"""Run on spawned ranks for ``test_cost_model_ring.py``: the ring's own counters, and a collective
calibration, to hold the cost model to."""
import torch
import torch.distributed as dist

import seqpar_compiler as sp
from seqpar_compiler.runtime import local_positions

SCHEDULES = ("ring", "zigzag", "striped", "distflash")


def ring_counters(rank, P, *, S_local=64, H=2, D=16, causal=True):
    """This rank's forward and backward attention FLOPs and bytes sent, per schedule."""
    S = S_local * P
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, H, S, D, generator=g) for _ in range(4)]
    out = {}
    for schedule in SCHEDULES:
        q, k, v, dout = (t[:, :, local_positions(schedule, rank, P, S)].contiguous() for t in full)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        with sp.stats() as fwd:
            o = sp.ring_attention(q, k, v, causal=causal, schedule=schedule)
        with sp.stats() as bwd:
            o.backward(dout)
        out[schedule] = {"forward": (fwd.attention_flops, fwd.bytes_sent),
                         "backward": (bwd.attention_flops, bwd.bytes_sent)}
    return out


def calibrate_case(rank, P, cache_dir):
    import os
    os.environ["XDG_CACHE_HOME"] = cache_dir
    from seqpar_compiler.profile import cache_path, calibrate
    with sp.stats() as st:                  # the user's counters do not count calibration's own attention
        profile = calibrate(dist.group.WORLD)
    dist.barrier()
    return {"profile": profile.as_dict(), "cached": cache_path().exists(),
            "counted": (st.attention_forward_calls, st.attention_flops)}


def run(rank, P, cache_dir):
    return {"counters": ring_counters(rank, P), "calibrate": calibrate_case(rank, P, cache_dir)}
