"""Benchmark: what the ring op itself holds. Peak RSS during one causal ring attention
forward, and during its backward, minus RSS before each, in units of one [S_local, H·D] fp32
tensor, on P one-thread gloo ranks; ``sdpa`` is ATen's attention in one process for comparison.
Inputs are laid out as a model's projections make them ([B, S, H, D] in memory).

    python bench/ring_memory.py                 # P=1 (SDPA and ring) and P=2 at S_local=8192, P=4 at 4096
    python bench/ring_memory.py --quick         # S_local = 1024

Prints a Markdown table and writes bench/results/ring_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _worker(rank, P, S_local, schedule, H, D):
    import torch
    import torch.distributed as dist
    import seqpar_compiler as sp
    from seqpar_compiler.process_memory import reset_peak_rss, status_kib, trim_malloc
    torch.manual_seed(rank)
    q, k, v = (torch.randn(1, S_local, H, D).transpose(1, 2).requires_grad_() for _ in range(3))
    group = dist.group.WORLD if P > 1 else None
    fwd = bwd = None
    for _ in range(2):                         # the second pass is measured
        trim_malloc()
        before = status_kib("VmRSS")
        reset_peak_rss()
        if schedule == "sdpa":
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = sp.ring_attention(q, k, v, causal=True, schedule=schedule, group=group)
        fwd = status_kib("VmHWM") - before
        g = torch.randn_like(out)
        trim_malloc()
        before = status_kib("VmRSS")
        reset_peak_rss()
        out.backward(g)
        bwd = status_kib("VmHWM") - before
        q.grad = k.grad = v.grad = None
        del out, g
    unit = S_local * H * D * 4 / 1024
    return {"forward_units": fwd / unit, "backward_units": bwd / unit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_path = args.out or os.path.join(os.path.dirname(__file__), "results",
                                        "ring_memory.quick.json" if args.quick else "ring_memory.json")
    import torch
    from seqpar_compiler.launch import run_ranks
    big, small = (1024, 1024) if args.quick else (8192, 4096)
    cases = [(1, big, "sdpa"), (1, big, "zigzag"), (2, big, "zigzag"), (4, small, "zigzag")]
    rows = []
    for P, S_local, schedule in cases:
        ranks = run_ranks(_worker, P, S_local, schedule, args.heads, args.head_dim, timeout=1800,
                          env={"MALLOC_MMAP_THRESHOLD_": "131072"})
        rows.append({"P": P, "S_local": S_local, "op": schedule,
                     "forward_units": [round(r["forward_units"], 2) for r in ranks],
                     "backward_units": [round(r["backward_units"], 2) for r in ranks]})
    print(f"peak RSS over RSS before, in [S_local, {args.heads}·{args.head_dim}] fp32 tensors (per rank)")
    print("| P | S_local | op | forward | backward |")
    print("|---|---|---|---|---|")
    for r in rows:
        rng = (lambda xs: f"{min(xs):.1f}" if max(xs) - min(xs) < 0.05 else f"{min(xs):.1f}–{max(xs):.1f}")
        print(f"| {r['P']} | {r['S_local']} | {r['op']} | {rng(r['forward_units'])} | {rng(r['backward_units'])} |")
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv), **vars(args)}
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
