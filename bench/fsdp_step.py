"""Benchmark: FSDP2 + per-block compile (torchtitan's arrangement) against today's whole-model
seqpar compile without FSDP, one training step of a LLaMA-style model.

    python bench/fsdp_step.py                    # S = 16384 on 2 and 4 ranks
    python bench/fsdp_step.py --S 4096 --ranks 2 # what fits on a loaded machine

Per rank and arrangement: step time (fwd + bwd + AdamW, best of ``--steps``) and activation
memory (peak RSS during forward + backward minus RSS before it, measured as
``bench/_step_memory.py`` does: peak reset through /proc/self/clear_refs, every large tensor its
own mmap). The two arrangements:

  * ``whole``: ``torch.compile(model, backend=seqpar)``, parameters replicated, one frame;
  * ``fsdp-per-block``: ``fully_shard`` on every block and on the root over the same ranks as the
    sequence group, each block ``torch.compile``d alone, the root (embedding, RoPE tables, final
    norm, head, loss) eager on ``SequenceShard`` values between the frames.

Targets: activation memory per rank and step time of ``fsdp-per-block`` within 1.1×
of ``whole``. FSDP2 holds 1/P of the parameters and gathers one block's at a time; with this
small model (the activations dominate) that is a few MiB either way. What is alive at each peak:
``bench/fsdp_live_tensors.py`` (it found the same-batch check's float64 copies of the first
block's full-length input at the P=4 peak, fixed in 5dfc1ba). Prints a table and writes
bench/results/fsdp_step.json (with the full command line, to rerun what a loaded machine cut).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


RANK_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}     # as bench/_step_memory.py: freed tensors leave RSS
ARRANGEMENTS = ("whole", "fsdp-per-block")


def _build(arrangement: str, S: int, layers: int, width: int, heads: int):
    """The model for ``arrangement`` and the callable a trainer steps (returns the loss only)."""
    import torch
    import torch.distributed as dist
    import seqpar_compiler as sp
    from models import Llama, LlamaConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layer=layers, n_embd=width, n_head=heads, n_kv_head=max(1, heads // 2),
                      ffn_hidden=4 * width, vocab_size=256, max_seq_len=S)
    model = Llama(cfg)
    backend = sp.backend(schedule="zigzag")
    if arrangement == "whole":
        compiled = torch.compile(model, backend=backend)
        return model, lambda idx, tgt: compiled(idx, tgt)[1], cfg
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(block, backend=backend)
        fully_shard(model.blocks[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, lambda idx, tgt: model(idx, tgt)[1], cfg


def step_worker(rank, P, arrangement, S, layers, width, heads, steps):
    """Compile (one step), then ``steps`` measured steps; time, activation memory, ring calls."""
    import torch
    import seqpar_compiler as sp
    from seqpar_compiler.runtime.sequence_shard import gather_count
    model, step_loss, cfg = _build(arrangement, S, layers, width, heads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (1, S), generator=g)
    tgt = torch.randint(0, cfg.vocab_size, (1, S), generator=g)

    def forward_backward():
        loss = step_loss(idx, tgt)
        loss.backward()
        return loss.item()

    def optimizer_step():
        opt.step()
        opt.zero_grad(set_to_none=False)
    start = time.perf_counter()
    loss0 = forward_backward()
    optimizer_step()
    from _step_memory import measure_steps
    out = measure_steps(forward_backward, optimizer_step, steps, compile_seconds=time.perf_counter() - start,
                        counters={"eager_shard_gathers": gather_count})
    return {**out, "first_loss": loss0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--S", type=int, nargs="+", default=[16384])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "fsdp_step.json"))
    args = ap.parse_args()
    import torch
    from seqpar_compiler.launch import run_ranks
    rows = []
    for S in args.S:
        for P in args.ranks:
            res = {a: run_ranks(step_worker, P, a, S, args.layers, args.width, args.heads, args.steps,
                                timeout=7200, pg_timeout=3600, env=RANK_ENV) for a in ARRANGEMENTS}
            w, f = res["whole"], res["fsdp-per-block"]
            row = {"S": S, "P": P}
            for name, r in (("whole", w), ("fsdp", f)):
                row[f"{name}_seconds"] = max(x["seconds"] for x in r)
                row[f"{name}_activation_mib_per_rank"] = max(x["activation_mib"] for x in r)
                row[f"{name}_peak_rss_mib_per_rank"] = max(x["peak_rss_mib"] for x in r)
                row[f"{name}_compile_seconds"] = max(x["compile_seconds"] for x in r)
                row[f"{name}_ring_calls"] = [x["attention_forward_calls"] for x in r]
                row[f"{name}_eager_shard_gathers"] = [x["eager_shard_gathers"] for x in r]
                row[f"{name}_peak_reset"] = all(x["peak_reset"] for x in r)
            row["memory_ratio"] = row["fsdp_activation_mib_per_rank"] / max(row["whole_activation_mib_per_rank"], 1e-9)
            row["time_ratio"] = row["fsdp_seconds"] / row["whole_seconds"]
            row["loss_equal"] = abs(w[0]["first_loss"] - f[0]["first_loss"]) <= 1e-5 * abs(w[0]["first_loss"])
            rows.append(row)
            print(f"S={S} P={P} done: {row}", flush=True)
    print(f"\nLLaMA-style {args.layers} layers, width {args.width}, {args.heads} heads, fwd+bwd+AdamW, one-thread "
          f"gloo ranks; whole = seqpar whole-model compile, fsdp = FSDP2 per block + per-block compile")
    print(f"{'S':>6} {'P':>2} {'whole s':>8} {'fsdp s':>8} {'t ratio':>8} {'whole act MiB':>14} {'fsdp act MiB':>13} "
          f"{'m ratio':>8} {'ring calls':>11}")
    for r in rows:
        print(f"{r['S']:>6} {r['P']:>2} {r['whole_seconds']:8.2f} {r['fsdp_seconds']:8.2f} {r['time_ratio']:8.2f} "
              f"{r['whole_activation_mib_per_rank']:14.0f} {r['fsdp_activation_mib_per_rank']:13.0f} "
              f"{r['memory_ratio']:8.2f} {str(r['fsdp_ring_calls']):>11}")
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv),
            "full_command": "python bench/fsdp_step.py --S 16384 --ranks 2 4",
            "load_average_at_end": os.getloadavg()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
