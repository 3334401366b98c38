"""Benchmark: a hybrid model's step memory per rank, sequence-parallel against one process.

transformers' Bamba from a tiny config (width 64; Mamba-2 mixer layers — causal conv1d, then the
chunked SSD scan — alternating with attention layers), one training step (forward + backward)
at S tokens: seqpar on P ranks (contiguous layout: the SSD's state passes rank to rank, the
conv1d exchanges a halo, attention is the ring) against the same model compiled in one process.

    python bench/hybrid_memory.py                    # S = 16384, P = 1, 2, 4, chunk 256
    python bench/hybrid_memory.py --quick            # S = 2048, chunk 64 (~1-2 min)
    python bench/hybrid_memory.py --model fla_gla    # the flash-linear-attention-style hybrid

Per rank (the largest over ranks):
  * saved MiB: the tensors autograd saves for the backward (a ``saved_tensors_hooks`` probe,
    counting each storage once, parameters not counted): the activation memory the step holds
    between forward and backward, deterministic;
  * step peak MiB: peak RSS during forward + backward minus RSS before it (``_step_memory.py``'s
    allocator-honest measure: every large tensor its own mmap, the peak reset before the step);
  * full-length saves: saved tensors with a dim of the global length S (0 when nothing of the
    whole sequence is kept);
  * compile s: the first call (Dynamo, seqpar's passes incl. the recurrence proof, aot_eager);
    step s: a later step.
A "seqpar, P = 1" row runs seqpar's memory passes (remat-aware checkpointing) in one process,
so what checkpointing saves and what splitting the sequence saves are told apart.
Both sides use the ``aot_eager`` compiler (CPU, 2 cores shared: inductor's C++ compile would
dominate). Prints a Markdown table and writes bench/results/hybrid_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "models"))


def _worker(rank, P, name, S, chunk, layers, steps, seqpar_alone=False):
    import torch
    import torch.distributed as dist
    if P == 1 and dist.is_initialized():
        dist.destroy_process_group()
    import seqpar_compiler as sp
    from _step_memory import measure_steps
    from hybrid_zoo import batch, build
    model = build(name, chunk=chunk, layers=layers)
    kwargs = {**batch(1, S), "use_cache": False}
    # seqpar in one process: its memory passes (remat-aware checkpointing) without sharding, to
    # tell what the checkpointing saves from what splitting the sequence saves
    backend = sp.backend(inner="aot_eager", schedule="ring") if P > 1 or seqpar_alone else "aot_eager"
    compiled = torch.compile(model, backend=backend)
    saves = {}

    def forward_backward():
        saved, full = {}, []

        def pack(t):
            if isinstance(t, torch.Tensor) and not t.is_meta and t.untyped_storage().data_ptr() not in params:
                st = t.untyped_storage()
                saved[st.data_ptr()] = st.nbytes()
                if S in t.shape and st.data_ptr() not in own:
                    full.append(tuple(t.shape))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = compiled(**kwargs)
            loss = out["loss"] if isinstance(out, dict) else out.loss
        saves.update(mib=sum(saved.values()) / 2**20, full=full)
        loss.backward()
        return float(loss.detach())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}        # model state, not activations
    own = {kwargs["input_ids"].untyped_storage().data_ptr(), kwargs["labels"].untyped_storage().data_ptr()}
    start = time.perf_counter()
    forward_backward()
    compile_seconds = time.perf_counter() - start
    result = measure_steps(forward_backward, lambda: model.zero_grad(set_to_none=False), steps,
                           compile_seconds=compile_seconds)
    result.update(saved_mib=saves["mib"], full_saves=len(saves["full"]))
    return result


def _measure(P, args, seqpar_alone=False):
    from seqpar_compiler.launch import run_ranks
    from _step_memory import RANK_ENV
    ranks = run_ranks(_worker, P, args.model, args.S, args.chunk, args.layers, args.steps, seqpar_alone,
                      timeout=4 * 3600, pg_timeout=3 * 3600, env=RANK_ENV)
    pick = {k: max(r[k] for r in ranks) for k in ("saved_mib", "activation_mib", "full_saves", "compile_seconds",
                                                 "seconds")}
    return {"P": P, "S": args.S, "what": "seqpar" if P > 1 or seqpar_alone else "one process", **pick}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bamba", choices=["bamba", "nemotron_h", "granite_hybrid", "fla_gla"])
    ap.add_argument("--S", type=int, default=16384)
    ap.add_argument("--P", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="S = 2048, chunk 64")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "hybrid_memory.json"))
    args = ap.parse_args()
    if args.quick:
        args.S, args.chunk = 2048, 64
    rows = []
    for P in args.P:
        rows.append(_measure(P, args))
        print(f"P={P}: {rows[-1]}", flush=True)
        if P == 1:
            rows.append(_measure(1, args, seqpar_alone=True))
            print(f"P=1 seqpar: {rows[-1]}", flush=True)
    base = next((r for r in rows if r["what"] == "one process"), None)
    print(f"\n{args.model}, {args.layers} layers, S={args.S}, chunk {args.chunk}, fp32, aot_eager, per rank:\n")
    print("| P | what | saved MiB | vs 1 process | step peak MiB | full-length saves | compile s | step s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['saved_mib'] / base['saved_mib']:.2f}x" if base else "-"
        print(f"| {r['P']} | {r['what']} | {r['saved_mib']:.1f} | {ratio} | {r['activation_mib']:.1f} | {r['full_saves']} | "
              f"{r['compile_seconds']:.1f} | {r['seconds']:.2f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": {k: getattr(args, k) for k in ("model", "S", "chunk", "layers", "steps")},
                   "machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
