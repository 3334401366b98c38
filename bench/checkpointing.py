"""Benchmark: SEQPAR_CHECKPOINT policies on one training step (docs/architecture.md).

    python bench/checkpointing.py               # GPT 4 layers, width 256, S = 8192, P = 2
    python bench/checkpointing.py --quick       # S = 1024, 2 layers, aot_eager: a smoke run (~1 min)
    python bench/checkpointing.py --S 16384 --ranks 4 --ffn-chunks 4

For none / remat-aware / full: step time (slowest rank), activation memory and peak RSS per
rank, and ring forwards per step (remat-aware: one per attention; full: two). The FFN runs
unchunked unless --ffn-chunks says otherwise, so only the policy differs. Writes
bench/results/checkpointing.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

POLICIES = ("none", "remat-aware", "full")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="S=1024, 2 layers, 1 measured step, aot_eager")
    ap.add_argument("--S", type=int, default=8192)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--ffn-chunks", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--inner", default=None, choices=("inductor", "aot_eager"), help="default: inductor")
    ap.add_argument("--out", default=None,
                    help="default: bench/results/checkpointing.json (checkpointing.quick.json with --quick)")
    args = ap.parse_args()
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                        "checkpointing.quick.json" if args.quick else "checkpointing.json")
    if args.quick:
        args.S, args.layers, args.steps = 1024, 2, 1
        args.inner = args.inner or "aot_eager"          # inductor compiles alone take minutes on 2 cores
    args.inner = args.inner or "inductor"
    import torch
    from seqpar_compiler.launch import run_ranks
    from _step_memory import RANK_ENV
    rows = []
    for policy in POLICIES:
        ranks = run_ranks(_worker, args.ranks, dict(
            S=args.S, layers=args.layers, width=args.width, steps=args.steps, checkpoint=policy,
            ffn_chunks=args.ffn_chunks, inner=args.inner, schedule="zigzag"),
            timeout=7200, pg_timeout=3600, env=RANK_ENV)
        rows.append({"policy": policy, "seconds": max(r["seconds"] for r in ranks),
                     "activation_mib_per_rank": max(r["activation_mib"] for r in ranks),
                     "peak_rss_mib_per_rank": max(r["peak_rss_mib"] for r in ranks),
                     "ring_forwards_per_step": ranks[0]["attention_forward_calls"],
                     "compile_seconds": max(r["compile_seconds"] for r in ranks)})
    full = next(r for r in rows if r["policy"] == "full")["seconds"]
    print(f"GPT {args.layers} layers, width {args.width}, S={args.S}, {args.ranks} one-thread ranks, "
          f"{args.inner}, ffn_chunks={args.ffn_chunks}; fwd+bwd+AdamW")
    print("| policy | step s | vs full | activation MiB/rank | peak RSS MiB/rank | ring fwd/step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['seconds']:.2f} | {full / r['seconds']:.2f}× "
              f"| {r['activation_mib_per_rank']:.0f} | {r['peak_rss_mib_per_rank']:.0f} | {r['ring_forwards_per_step']} |")
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv), **vars(args)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


def _worker(rank, P, kwargs):
    from _step_memory import step_worker
    return step_worker(rank, P, **kwargs)


if __name__ == "__main__":
    main()
