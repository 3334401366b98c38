"""The real-code tier: real third-party model code through seqpar on 2 ranks, one training step
each against the same step in one process. Prints a table and writes JSON.

    python bench/real_models.py                      # every architecture of the list
    python bench/real_models.py --only llama,opt     # a few
    python bench/real_models.py --ranks 4 --schedule striped

Columns: exact (loss and logits within 1e-5, every gradient within 1e-4, relative, fp32),
fully sharded (exact, the ring ran, and seqpar warned of no gather, replicated attention or exit
gather), and why not. A wrong number or a crash is a failure of seqpar, never an acceptable row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "models"))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def _row(name: str, results: list[dict]) -> dict:
    """One row from every rank's result: the worst rank decides."""
    order = {"crash": 0, "wrong": 1, "exact": 2}
    worst = min(results, key=lambda r: order[r["status"]])
    why = worst.get("error") or "; ".join(worst.get("fallbacks", [])) or ""
    if worst["status"] == "wrong":
        why = (f"loss {worst['loss']:.1e}, logits {worst['logits']:.1e}, worst grad {worst['worst_grad'][0]} "
               f"{worst['worst_grad'][1]:.1e}. " + why)
    return {"architecture": name, "status": worst["status"],
            "fully_sharded": all(r.get("fully_sharded") for r in results),
            "ring_calls": worst.get("ring_calls"), "gathers": worst.get("gathers"), "why_not": why}


def main() -> None:
    from real_model_workers import run_real_models
    from real_model_zoo import ARCHITECTURES

    from seqpar_compiler.launch import run_ranks
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated names (default: all)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--schedule", default="zigzag")
    ap.add_argument("--inner", default="aot_eager")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "real_models.json"))
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(ARCHITECTURES)
    unknown = [n for n in names if n not in ARCHITECTURES]
    if unknown:
        sys.exit(f"unknown architecture(s) {unknown}; known: {', '.join(ARCHITECTURES)}")
    start = time.time()
    results = run_ranks(run_real_models, args.ranks, names, {"schedule": args.schedule, "inner": args.inner},
                        timeout=60 * 60, pg_timeout=900)
    rows = [_row(n, [r[n] for r in results]) for n in names]
    print(f"{'architecture':28s} {'exact':6s} {'sharded':8s} {'ring':>5s} {'gathers':>7s}  why not")
    for r in rows:
        print(f"{r['architecture']:28s} {r['status']:6s} {'yes' if r['fully_sharded'] else 'no':8s} "
              f"{r['ring_calls'] if r['ring_calls'] is not None else '-':>5} "
              f"{r['gathers'] if r['gathers'] is not None else '-':>7}  {r['why_not'][:150]}")
    exact = sum(r["status"] == "exact" for r in rows)
    full = sum(r["fully_sharded"] for r in rows)
    print(f"\n{exact}/{len(rows)} exact, {full}/{len(rows)} fully sharded ({args.ranks} ranks, "
          f"{args.schedule}, {args.inner}); {time.time() - start:.0f} s")
    if not args.only:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"ranks": args.ranks, "schedule": args.schedule, "inner": args.inner, "rows": rows,
                       "per_rank": results}, f, indent=1, default=str)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
