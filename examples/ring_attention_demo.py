"""Ring attention on P gloo ranks, checked against single-process attention.

    python examples/ring_attention_demo.py [--ranks 2] [--seq 4096] [--schedule zigzag]

Spawns P ranks on this machine (no torchrun needed), splits a causal attention problem of
length S over them in the schedule's layout, runs the ring forward and backward, gathers the
result and compares it with one process computing the whole sequence. Prints the error
||ring - single|| / ||single|| for out and dq/dk/dv, each rank's share of the attention FLOPs
and bytes sent, and the wall time of both.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

B, H, D = 1, 8, 64


def _inputs(S):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, S, D, generator=g) for _ in range(4)]


def rank_main(rank, P, S, schedule):
    import seqpar_compiler as sp
    q, k, v, dout = _inputs(S)
    # every rank holds only its 1/P of the tokens
    q, k, v = (sp.shard_sequence(t, 2, schedule=schedule).requires_grad_() for t in (q, k, v))
    dout = sp.shard_sequence(dout, 2, schedule=schedule)
    with sp.stats() as s:
        start = time.perf_counter()
        out = sp.ring_attention(q, k, v, causal=True, schedule=schedule)
        out.backward(dout)
        seconds = time.perf_counter() - start
    full = [sp.gather_sequence(t, 2, schedule=schedule) for t in (out, q.grad, k.grad, v.grad)]
    return {"seconds": seconds, "stats": s.as_dict(), "full": full if rank == 0 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--schedule", default="zigzag", choices=("ring", "zigzag", "striped", "distflash"))
    args = ap.parse_args()
    from seqpar_compiler.launch import run_ranks

    P, S = args.ranks, args.seq
    print(f"causal attention, B={B} H={H} D={D} S={S}: {P} ranks, schedule {args.schedule}")
    res = run_ranks(rank_main, P, S, args.schedule, timeout=1800, pg_timeout=600)

    torch.set_num_threads(1)
    q, k, v, dout = _inputs(S)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    start = time.perf_counter()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref.backward(dout)
    single = time.perf_counter() - start

    worst = 0.0
    for name, got, exp in zip(("out", "dq", "dk", "dv"), res[0]["full"], (ref, q.grad, k.grad, v.grad)):
        err = ((got - exp).norm() / exp.norm()).item()
        worst = max(worst, err)
        print(f"  {name}: ||ring - single|| / ||single|| = {err:.2e}")
    flops = [r["stats"]["attention_flops"] for r in res]
    for rank, r in enumerate(res):
        st = r["stats"]
        print(f"  rank {rank}: {100 * st['attention_flops'] / sum(flops):5.1f}% of attention FLOPs, "
              f"{st['bytes_sent'] / 2**20:7.1f} MiB sent, {r['seconds']:.3f} s")
    ring_seconds = max(r["seconds"] for r in res)
    print(f"  one process: {single:.3f} s; {P} ranks: {ring_seconds:.3f} s "
          f"(max/mean FLOPs {max(flops) / (sum(flops) / P):.3f})")
    ok = worst < 1e-4
    print("OK: the ring matches single-process attention" if ok else "MISMATCH")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
