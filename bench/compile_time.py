"""Benchmark: compile time of the seqpar stages alone: canonicalize, placements and
the rewrite (with every re-trace the generic ATen rule does), on the Dynamo graph of a Hugging
Face Llama of L layers, not counting Dynamo's trace or the inner compiler (aot_autograd,
inductor). Runs in one process over a fake process group of P ranks (nothing is communicated at
compile time). Target from the issue: under 5 s at 32 layers.

    python bench/compile_time.py                # L = 2, 8, 32 with sdpa and eager attention
    python bench/compile_time.py --layers 32 --impl sdpa

Prints a Markdown table and writes bench/results/compile_time.json.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import time


def _capture(layers: int, impl: str, S: int):
    import torch
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * S,
                                   attn_implementation=impl, use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    captured = []

    def keep(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward
    torch._dynamo.reset()
    ids = torch.randint(0, 128, (1, S))
    torch.compile(model, backend=keep)(ids, labels=ids)
    return max(captured, key=lambda c: len(c[0].graph.nodes))


def _measure(layers: int, impl: str, S: int, P: int, repeats: int) -> dict:
    import torch.distributed as dist
    import importlib
    be = importlib.import_module("seqpar_compiler.backend")   # the package exports a function of that name
    from seqpar_compiler.options import resolve_options
    gm, example_inputs = _capture(layers, impl, S)
    opts = resolve_options(schedule="zigzag", inner="aot_eager")
    times, fallbacks = [], None
    for _ in range(repeats):
        g = copy.deepcopy(gm)
        gc.collect()           # garbage of earlier captures is not the seqpar stages' cost
        t0 = time.perf_counter()
        out = be._shard_graph(g, example_inputs, dist.group.WORLD, opts)
        times.append(time.perf_counter() - t0)
        fallbacks = sum(1 for n in out.graph.nodes if n.op == "call_function"
                        and "gather_sequence" in str(n.target)) if out is not None else None
    return {"layers": layers, "impl": impl, "S": S, "P": P, "nodes": len(gm.graph.nodes),
            "seconds_min": min(times), "seconds_all": times, "gathers": fallbacks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="*", default=[2, 8, 32])
    ap.add_argument("--impl", nargs="*", default=["sdpa", "eager"])
    ap.add_argument("--S", type=int, default=64)
    ap.add_argument("--P", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "compile_time.json"))
    args = ap.parse_args()
    import warnings

    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    warnings.simplefilter("ignore")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.P)
    rows = [_measure(L, impl, args.S, args.P, args.repeats) for impl in args.impl for L in args.layers]
    print("| layers | attention | graph nodes | seqpar stages (s, best of %d) | all-gathers in graph (0: the returned logits leave the frame as a shard) |" % args.repeats)
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['impl']} | {r['nodes']} | {r['seconds_min']:.2f} | {r['gathers']} |")
    import torch
    meta = {"torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "note": "seqpar stages only (canonicalize + placements + rewrite), no Dynamo, no inner compiler"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
