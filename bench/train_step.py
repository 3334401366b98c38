"""Benchmark: one training step (fwd + bwd + AdamW) of the example GPT through the seqpar backend
on P one-thread gloo ranks, against the same model compiled with inductor in one one-thread
process.

    python bench/train_step.py            # GPT 4 layers, width 256, 8 heads, S = 4096, 8192
    python bench/train_step.py --quick    # S = 1024, 2048 (alias --small)

Prints time, speedup and memory per rank, writes bench/results/train_step.json.
"Activation memory" is the peak RSS during the step minus the RSS before it (docs/architecture.md); the
peak is reset before the step through /proc/self/clear_refs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

from seqpar_compiler.process_memory import reset_peak_rss, status_kib  # noqa: E402


def step_worker(rank, P, S, backend_name, steps):
    import torch
    import seqpar_compiler as sp
    from models import GPT, GPTConfig
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, n_embd=256, n_head=8, vocab_size=256, block_size=S)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    backend = sp.backend(schedule="zigzag") if backend_name == "seqpar" else "inductor"
    compiled = torch.compile(model, backend=backend)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (1, S), generator=g)
    tgt = torch.randint(0, cfg.vocab_size, (1, S), generator=g)

    def step():
        _, loss = compiled(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    start = time.perf_counter()
    step()                                   # compile
    compile_s = time.perf_counter() - start
    times, act = [], []
    for _ in range(steps):
        before = status_kib("VmRSS")
        reset_peak_rss()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        act.append(status_kib("VmHWM") - before)
    return {"seconds": min(times), "activation_mib": min(act) / 1024, "peak_rss_mib": status_kib("VmHWM") / 1024,
            "compile_seconds": compile_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", "--quick", dest="small", action="store_true", help="S = 1024, 2048")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_step.json"))
    args = ap.parse_args()
    import torch
    from seqpar_compiler.launch import run_ranks
    sizes = (1024, 2048) if args.small else (4096, 8192)
    rows = []
    for S in sizes:
        single = run_ranks(step_worker, 1, S, "inductor", args.steps, timeout=3600, pg_timeout=1800)[0]
        ranks = run_ranks(step_worker, args.ranks, S, "seqpar", args.steps, timeout=3600, pg_timeout=1800)
        worst = max(r["seconds"] for r in ranks)
        act = max(r["activation_mib"] for r in ranks)
        rows.append({"S": S, "P": args.ranks, "single_seconds": single["seconds"], "seqpar_seconds": worst,
                     "speedup": single["seconds"] / worst, "single_activation_mib": single["activation_mib"],
                     "seqpar_activation_mib_per_rank": act,
                     "activation_ratio": act / single["activation_mib"] if single["activation_mib"] else None,
                     "single_peak_rss_mib": single["peak_rss_mib"],
                     "seqpar_peak_rss_mib_per_rank": max(r["peak_rss_mib"] for r in ranks)})
    print(f"GPT 4 layers, width 256, 8 heads, fwd+bwd+AdamW; {args.ranks} one-thread ranks (seqpar, zigzag) "
          f"vs one one-thread process (inductor)")
    print(f"{'S':>6} {'1-proc s':>9} {'seqpar s':>9} {'speedup':>8} {'act MiB 1-proc':>15} {'act MiB/rank':>13} "
          f"{'ratio':>6}")
    for r in rows:
        ratio = f"{r['activation_ratio']:.2f}" if r["activation_ratio"] else "n/a"
        print(f"{r['S']:>6} {r['single_seconds']:9.2f} {r['seqpar_seconds']:9.2f} {r['speedup']:7.2f}x "
              f"{r['single_activation_mib']:15.0f} {r['seqpar_activation_mib_per_rank']:13.0f} {ratio:>6}")
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
