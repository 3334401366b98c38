"""Ring schedules vs all-to-all (Ulysses) vs hybrid: causal attention forward + backward on this
machine at P = 2 and 4 (gloo ranks on CPU), on a plain causal sequence and on packed documents
with a long-tailed length distribution. Per schedule: time (median over reps),
max/mean attention work per rank (stats().attention_flops), bytes sent per rank (ring and
all-to-all apart, and the all-to-all's backward share: dout in, dq/dk/dv out), and the cost model's prediction beside the time (this machine's cached
profile; the model does not see documents). Then GPU-cluster predictions (h100-dgx profile, an
H100 node of 8, P = 8, 16, 64, 8k tokens per GPU) — predictions, not measurements.

Last, what the all-to-all op's backward costs in memory: bytes of the tensors the compiled
step saves for the backward (saved_tensors_hooks, parameters excluded) on the example LLaMA
(2 layers, 4 query / 2 KV heads) at P = 2, ring vs ulysses under each checkpoint policy, with
the backward's bytes sent. (The op saves its head-sharded q, k, v, out, lse so the backward
sends only dout and the gradients: more saved than the ring under remat-aware, which
recomputes q, k, v from the layer input.)

    python bench/ulysses.py [--S 4096] [--reps 3]     → table + bench/results/ulysses.json
    python bench/ulysses.py --saved-only               → the memory table alone, merged into the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

RING = ("ring", "zigzag", "striped")


def _docs(S: int, seed: int = 0) -> torch.Tensor:
    """Packed document ids [1, S], long-tailed lengths: a Pareto draw (alpha 1.2), so a few long
    documents hold most tokens and many are short."""
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < S:
        n = max(8, int(64 * (1 - torch.rand((), generator=g).item()) ** (-1 / 1.2)))
        lengths.append(min(n, S - total))
        total += lengths[-1]
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


def worker(rank, P, S, H, D, reps, cases):
    import seqpar_compiler as sp
    from seqpar_compiler.runtime import local_positions
    torch.manual_seed(0)
    q64, k64, v64 = (torch.randn(1, H, S, D) for _ in range(3))
    docs = _docs(S)
    out = {}
    for schedule, packed in cases:
        layout = "hybrid:2" if schedule == "hybrid" else schedule
        idx = local_positions(layout, rank, P, S)
        q, k, v = (t[:, :, idx].clone().requires_grad_() for t in (q64, k64, v64))
        doc = docs[:, idx] if packed else None

        def step():
            if schedule in RING:
                o = sp.ring_attention(q, k, v, causal=True, doc_ids=doc, schedule=schedule)
            else:
                o = sp.ulysses_attention(q, k, v, causal=True, doc_ids=doc, schedule=schedule,
                                         ulysses_degree=2 if schedule == "hybrid" else None)
            with sp.stats() as bwd:                   # nested: the outer block counts it too
                o.sum().backward()
            return bwd
        step()                                        # warm-up (agreement checks, groups)
        times = []
        for _ in range(reps):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            with sp.stats() as s:
                bwd = step()
            times.append(time.perf_counter() - t0)
        out[f"{schedule}/{'docs' if packed else 'causal'}"] = {
            "seconds": statistics.median(times), "flops": s.attention_flops,
            "ring_bytes": s.bytes_sent, "a2a_bytes": s.a2a_bytes_sent, "a2a_bwd_bytes": bwd.a2a_bytes_sent}
    return out


def _predict(schedule, P, S, H, D, profile):
    from seqpar_compiler.cost_model import AttentionSpec, predict
    if profile is None:
        return None
    layout = "hybrid:2" if schedule == "hybrid" else schedule
    return predict(AttentionSpec(B=1, Hq=H, Hkv=H, S=S, D=D), layout, P, profile).seconds


def saved_worker(rank, P, S, cases):
    """Bytes saved for the backward by one compiled training step, and the backward's traffic."""
    import seqpar_compiler as sp
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from models import Llama, LlamaConfig
    out = {}
    for schedule, checkpoint in cases:
        torch.manual_seed(0)
        m = Llama(LlamaConfig(n_layer=2))
        g = torch.Generator().manual_seed(1)
        idx, tgt = torch.randint(0, 256, (2, S), generator=g), torch.randint(0, 256, (2, S), generator=g)
        torch._dynamo.reset()
        cm = torch.compile(m, backend=sp.backend(inner="aot_eager", schedule=schedule, checkpoint=checkpoint))
        storages = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = cm(idx, tgt)
        with sp.stats() as s:
            loss.backward()
        out[f"{schedule}/{checkpoint}"] = {"saved_bytes": sum(storages.values()),
                                           "backward_bytes_sent": s.bytes_sent + s.a2a_bytes_sent}
    return out


def saved_rows(S: int = 256) -> list[dict]:
    from seqpar_compiler.launch import run_ranks
    cases = [(s, c) for c in ("remat-aware", "full") for s in ("zigzag", "ulysses")]
    res = run_ranks(saved_worker, 2, S, cases, timeout=1200)
    return [{"P": 2, "S": S, "schedule": s, "checkpoint": c,
             "saved_bytes_per_rank": max(r[f"{s}/{c}"]["saved_bytes"] for r in res),
             "backward_bytes_sent_per_rank": max(r[f"{s}/{c}"]["backward_bytes_sent"] for r in res)}
            for s, c in cases]


def _print_saved(rows) -> None:
    print(f"\nsaved for the backward, example LLaMA (2 layers, Hq=4, Hkv=2), P=2, S={rows[0]['S']}, aot_eager")
    print(f"{'schedule':9} {'checkpoint':12} {'saved KiB':>10} {'bwd sent KiB':>12}")
    for r in rows:
        print(f"{r['schedule']:9} {r['checkpoint']:12} {r['saved_bytes_per_rank'] / 1024:10.1f} "
              f"{r['backward_bytes_sent_per_rank'] / 1024:12.1f}")


def cluster_predictions() -> list[dict]:
    """h100-dgx: 32 heads of 128, bf16, causal, 8192 tokens per GPU."""
    from seqpar_compiler.cost_model import AttentionSpec, predict
    from seqpar_compiler.profile import load_profile
    prof = load_profile("h100-dgx")
    rows = []
    for P in (8, 16, 64):
        spec = AttentionSpec(B=1, Hq=32, Hkv=8, S=8192 * P, D=128, dtype_bytes=2)
        # 32 query heads: ulysses needs P | 32, so P = 64 runs as the hybrid (u = 8: a node) only
        for schedule in ("ring", "zigzag", "ulysses", "hybrid:8"):
            if schedule == "ulysses" and 32 % P:
                continue
            if schedule == "hybrid:8" and P == 8:
                continue
            p = predict(spec, schedule, P, prof)
            flops = 4 * spec.B * spec.Hq * spec.D * spec.S * (spec.S + 1) / 2 / P * (1 + 2.5)   # fwd + bwd
            rows.append({"P": P, "schedule": schedule, "ms": p.seconds * 1e3, "imbalance": p.imbalance,
                         "tflops_per_gpu": flops / p.seconds / 1e12,
                         "a2a_ms": p.notes.get("a2a_seconds", 0.0) * 1e3})
    return rows


def main(argv=None):
    from seqpar_compiler.launch import run_ranks
    from seqpar_compiler.profile import load_profile
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ulysses.json"))
    ap.add_argument("--saved-only", action="store_true", help="only the saved-memory table, merged into --out")
    args = ap.parse_args(argv)
    if args.saved_only:
        saved = saved_rows()
        _print_saved(saved)
        with open(args.out) as f:
            data = json.load(f)
        data["saved_for_backward"] = saved
        with open(args.out, "w") as f:
            json.dump(data, f, indent=2)
        print(f"\nwrote {args.out}")
        return
    profile = load_profile(None)          # this machine's cached calibration, if any
    rows = []
    for P in (2, 4):
        scheds = list(RING) + ["ulysses"] + (["hybrid"] if P == 4 else [])
        cases = [(s, packed) for packed in (False, True) for s in scheds]
        res = run_ranks(worker, P, args.S, args.H, args.D, args.reps, cases, timeout=1200)
        for s, packed in cases:
            key = f"{s}/{'docs' if packed else 'causal'}"
            per = [r[key] for r in res]
            flops = [x["flops"] for x in per]
            pred = _predict(s, P, args.S, args.H, args.D, profile)
            rows.append({"P": P, "schedule": s, "input": "docs" if packed else "causal",
                         "seconds": max(x["seconds"] for x in per), "max_over_mean_work": max(flops) / (sum(flops) / P),
                         "ring_bytes_per_rank": max(x["ring_bytes"] for x in per),
                         "a2a_bytes_per_rank": max(x["a2a_bytes"] for x in per),
                         "a2a_backward_bytes_per_rank": max(x["a2a_bwd_bytes"] for x in per),
                         "predicted_seconds": pred})
    print(f"S={args.S} H={args.H} D={args.D} fp32 causal fwd+bwd, gloo on CPU, median of {args.reps} "
          f"(profile: {profile.name if profile else 'none cached: no predictions'})")
    print(f"{'P':>2} {'schedule':9} {'input':6} {'time ms':>9} {'pred ms':>9} {'max/mean':>8} "
          f"{'ring MiB':>9} {'a2a MiB':>8} {'(of it bwd)':>11}")
    for r in rows:
        pred = f"{r['predicted_seconds'] * 1e3:9.1f}" if r["predicted_seconds"] else f"{'-':>9}"
        print(f"{r['P']:>2} {r['schedule']:9} {r['input']:6} {r['seconds'] * 1e3:9.1f} {pred} "
              f"{r['max_over_mean_work']:8.3f} {r['ring_bytes_per_rank'] / 2**20:9.2f} "
              f"{r['a2a_bytes_per_rank'] / 2**20:8.2f} {r['a2a_backward_bytes_per_rank'] / 2**20:11.2f}")
    cluster = cluster_predictions()
    print("\nPREDICTIONS (cost model, h100-dgx profile; not measured): causal fwd+bwd, 32 q heads / 8 KV heads of "
          "128, bf16, 8192 tokens per GPU")
    print(f"{'P':>3} {'schedule':9} {'ms':>8} {'a2a ms':>7} {'TFLOP/s/GPU':>11} {'imbalance':>9}")
    for r in cluster:
        print(f"{r['P']:>3} {r['schedule']:9} {r['ms']:8.2f} {r['a2a_ms']:7.2f} {r['tflops_per_gpu']:11.0f} "
              f"{r['imbalance']:9.3f}")
    saved = saved_rows()
    _print_saved(saved)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "profile": profile.name if profile else None, "measured": rows,
                   "cluster_predictions": cluster, "saved_for_backward": saved}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
