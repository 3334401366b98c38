"""Benchmark: the ``transformers.Trainer`` recipe of docs/training.md ("Training with Hugging Face") on P
one-thread gloo ranks against the same Trainer in one one-thread process.

    python bench/hf_trainer.py            # S = 8192, 2 ranks
    python bench/hf_trainer.py --quick    # S = 1024

A Llama from a config (4 layers, width 256, 8 query / 4 KV heads, vocabulary 256, sdpa, fp32),
one sequence of S tokens per step, AdamW, ``model.compile(backend="seqpar")`` (inductor) before
``sequence_parallel(Trainer)(...)``. Three runs of the same script:
  * one process: seqpar at P = 1 is inductor plus the memory passes;
  * P ranks, the recipe: DDP (which Trainer wraps the model in) reduces over the data-parallel
    ranks only, so with one sequence group it reduces nothing;
  * P ranks, DDP's own reduction left on ("before"): every gradient seqpar summed over the group
    is all-reduced again.
Step time: the fastest of the steps after the first (which compiles). All-reduce: every gloo
all-reduce of one steady step on rank 0 (seqpar's gradient sums, DDP's buckets, the loss, the
same-batch check), from the profiler's record of each collective, counted as fp32 elements
(4 bytes each; the same-batch check's few float64 sums count at half their size).
Prints a table, writes bench/results/hf_trainer.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time


def trainer_worker(rank, world, S, steps, reduce_once):
    import torch
    import torch.distributed as dist
    import datasets
    import transformers
    import seqpar_compiler as sp
    from seqpar_compiler import hf as sp_hf
    from torch.profiler import ProfilerActivity, profile
    if world == 1:
        dist.destroy_process_group()             # the reference is one plain process
    else:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=S,
                                   attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg)
    model.compile(backend=sp.backend(schedule="zigzag"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (steps, S), generator=g)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    times, profiled = [], {}

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                profiled["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                profiled["prof"].__enter__()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)
            if "prof" in profiled and "sizes" not in profiled:
                profiled["prof"].__exit__(None, None, None)
                profiled["sizes"] = [int(torch.Size(e.input_shapes[0]).numel()) for e in profiled["prof"].events()
                                     if e.name == "gloo:all_reduce" and e.input_shapes and e.input_shapes[0]]

    class Before(sp_hf.sequence_parallel(transformers.Trainer)):
        def training_step(self, model, inputs, *args, **kwargs):
            model._seqpar_reduce_once = True          # marks DDP as handled: its own reduction stays on
            return super().training_step(model, inputs, *args, **kwargs)

    cls = sp_hf.sequence_parallel(transformers.Trainer) if reduce_once else Before
    args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1,
                                          max_steps=steps, learning_rate=1e-4, report_to=[], save_strategy="no",
                                          use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True)
    trainer = cls(model=model, args=args, train_dataset=data, data_collator=transformers.default_data_collator,
                  callbacks=[Timer()])
    trainer.train()
    sizes = profiled.get("sizes", [])
    return {"step_seconds": min(times[1:]), "compile_step_seconds": times[0],
            "allreduce_mib": sum(sizes) * 4 / 2 ** 20, "allreduce_calls": len(sizes),
            "gradient_mib": sum(p.numel() for p in model.parameters()) * 4 / 2 ** 20,
            "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="S = 1024")
    ap.add_argument("--S", type=int, default=None)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "hf_trainer.json"))
    args = ap.parse_args()
    import torch
    from seqpar_compiler.launch import run_ranks
    S = args.S or (1024 if args.quick else 8192)
    runs = {"one process": run_ranks(trainer_worker, 1, S, args.steps, True, timeout=7200, pg_timeout=3600)[0]}
    for name, reduce_once in ((f"{args.ranks} ranks, recipe", True), (f"{args.ranks} ranks, DDP reduces again", False)):
        ranks = run_ranks(trainer_worker, args.ranks, S, args.steps, reduce_once, timeout=7200, pg_timeout=3600)
        runs[name] = {**ranks[0], "step_seconds": max(r["step_seconds"] for r in ranks)}
    base = runs["one process"]["step_seconds"]
    rows = [{"run": name, "S": S, "step_seconds": r["step_seconds"], "speedup": base / r["step_seconds"],
             "allreduce_mib_per_step": r["allreduce_mib"], "allreduce_calls_per_step": r["allreduce_calls"],
             "gradient_mib": r["gradient_mib"], "compile_step_seconds": r["compile_step_seconds"], "loss": r["loss"]}
            for name, r in runs.items()]
    print(f"HF Trainer, Llama 4 layers width 256, S={S}, fwd+bwd+AdamW, one-thread processes "
          f"(gradients: {rows[0]['gradient_mib']:.1f} MiB)")
    print(f"{'run':<28} {'step s':>7} {'speedup':>8} {'all-reduce MiB/step':>20} {'all-reduces/step':>17}")
    for r in rows:
        print(f"{r['run']:<28} {r['step_seconds']:7.2f} {r['speedup']:7.2f}x {r['allreduce_mib_per_step']:20.2f} "
              f"{r['allreduce_calls_per_step']:17d}")
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python"] + sys.argv),
            "load_average": os.getloadavg()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
