"""Benchmark: the memory claim. Activation memory per rank of one full training step of
the example GPT (width 256, 4 layers), seqpar (remat-aware checkpointing + blockwise FFN) on P
ranks against plain single-process inductor, over sequence lengths S.

    python bench/memory.py                 # S = 4096..32768, P = 1, 2, 4, check run toward the P=4 limit
    python bench/memory.py --quick         # 2 layers, S = 512, 1024; P = 1, 2; aot_eager (also the
                                           # baseline); no check run (~1-2 min)
    python bench/memory.py --S 4096 8192 --P 2 4 --budget-gib 4 --ffn-chunks 4

Activation memory = peak RSS during the step minus RSS before it (docs/architecture.md; bench/_step_memory.py).
The compiled step returns the loss only (``--logits``: the logits too, which with the default
SEQPAR_OUTPUT=gather puts the full [S, vocab] logits on every rank).
A least-squares line a + b·S through each P's seqpar points gives the longest S whose activations
fit the budget (default 4 GiB per rank); one run at that S (rounded down, capped by --check-cap)
checks the fit for the largest P. Prints a Markdown table, writes bench/results/memory.json and
a plot bench/results/memory.png. P = 1 runs as a plain single process (no process group).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def _worker(rank, P, kwargs):
    from _step_memory import step_worker
    return step_worker(rank, P, **kwargs)


def _measure(P, S, args, backend="seqpar", steps=None):
    from seqpar_compiler.launch import run_ranks
    from _step_memory import RANK_ENV
    kwargs = dict(S=S, layers=args.layers, width=args.width, steps=steps or args.steps, backend=backend,
                  logits=args.logits)
    if backend == "seqpar":
        kwargs.update(checkpoint="remat-aware", ffn_chunks=args.ffn_chunks, inner=args.inner, schedule="zigzag")
    ranks = run_ranks(_worker, P, kwargs, timeout=4 * 3600, pg_timeout=3 * 3600, env=RANK_ENV)
    return {"S": S, "P": P, "backend": "seqpar" if backend == "seqpar" else f"{backend} (1 process)",
            "activation_mib": max(r["activation_mib"] for r in ranks),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks), "seconds": max(r["seconds"] for r in ranks)}


_SETTINGS = ("layers", "width", "ffn_chunks", "steps", "inner", "logits")


def _save_partial(args, rows) -> None:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".partial", "w") as f:
        json.dump({"settings": {k: getattr(args, k) for k in _SETTINGS}, "rows": rows}, f, indent=2)


def _resumed_rows(args) -> list:
    """Rows of an interrupted run with the same settings (``<out>.partial``), to measure only the rest."""
    try:
        with open(args.out + ".partial") as f:
            saved = json.load(f)
    except FileNotFoundError:
        return []
    mine = {k: getattr(args, k) for k in _SETTINGS}
    if saved["settings"] != mine:
        raise SystemExit(f"--resume: {args.out}.partial was measured with {saved['settings']}, not {mine}")
    print(f"resuming: {len(saved['rows'])} rows from {args.out}.partial")
    return saved["rows"]


def _fit(points):
    """Least-squares a + b·S through (S, MiB) points: (a, b)."""
    n = len(points)
    sx = sum(s for s, _ in points)
    sy = sum(m for _, m in points)
    sxx = sum(s * s for s, _ in points)
    sxy = sum(s * m for s, m in points)
    b = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    return (sy - b * sx) / n, b


def _plot(rows, fits, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in sorted({(r["backend"], r["P"]) for r in rows}):
        pts = sorted((r["S"], r["activation_mib"]) for r in rows if (r["backend"], r["P"]) == label)
        name = f"seqpar P={label[1]}" if label[0] == "seqpar" else label[0]
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        if label[0] == "seqpar" and label[1] in fits:
            a, b = fits[label[1]]
            xs = [pts[0][0], pts[-1][0]]
            ax.plot(xs, [a + b * x for x in xs], ":", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence length S")
    ax.set_ylabel("activation MiB per rank (peak RSS − RSS before)")
    ax.set_title("GPT width 256: one training step (dotted: linear fit)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--S", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--P", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--ffn-chunks", type=int, default=None, help="default: the registry's SEQPAR_FFN_CHUNKS")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--inner", default=None, choices=("inductor", "aot_eager"), help="default: inductor")
    ap.add_argument("--budget-gib", type=float, default=4.0)
    ap.add_argument("--check-cap", type=int, default=65536,
                    help="largest S for the check run (attention time grows as S²: on 2 cores a P=4 step takes "
                         "~25 s at S=16384, so ~7 min at 65536 and ~25 min at 131072)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--check-steps", type=int, default=1, help="measured steps of the (long) check run")
    ap.add_argument("--logits", action="store_true",
                    help="the compiled step returns the logits too (default: the loss only; with SEQPAR_OUTPUT=gather "
                         "every rank then holds the full [S, vocab] logits)")
    ap.add_argument("--no-baseline", action="store_true", help="skip plain single-process inductor")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the rows an interrupted run with the same settings saved in <out>.partial")
    ap.add_argument("--out", default=None,
                    help="default: bench/results/memory.json (memory.quick.json with --quick)")
    args = ap.parse_args()
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                        "memory.quick.json" if args.quick else "memory.json")
    if args.quick:
        args.S, args.P, args.steps, args.no_check, args.layers = [512, 1024], [1, 2], 1, True, 2
        args.inner = args.inner or "aot_eager"          # inductor compiles alone take minutes on 2 cores
    args.inner = args.inner or "inductor"
    import torch
    from seqpar_compiler.options import OPTIONS
    if args.ffn_chunks is None:
        args.ffn_chunks = OPTIONS["ffn_chunks"].default
    rows = _resumed_rows(args) if args.resume else []
    done = {(r["S"], r["P"], r["backend"]) for r in rows}
    baseline = "aot_eager" if args.quick else "inductor"
    for S in args.S:
        todo = ([] if args.no_baseline else [(1, baseline)]) + [(P, "seqpar") for P in args.P]
        for P, backend in todo:
            label = "seqpar" if backend == "seqpar" else f"{backend} (1 process)"
            if (S, P, label) not in done:
                rows.append(_measure(P, S, args, backend=backend))
                _save_partial(args, rows)           # a long run that dies later keeps its rows
    budget = args.budget_gib * 1024
    fits, limits = {}, {}
    for P in args.P:
        pts = [(r["S"], r["activation_mib"]) for r in rows if r["backend"] == "seqpar" and r["P"] == P]
        if len(pts) >= 2:
            fits[P] = _fit(pts)
            a, b = fits[P]
            limits[P] = int((budget - a) / b) if b > 0 else None
    check = None
    Pmax = max(args.P)
    if not args.no_check and limits.get(Pmax):
        S_check = min(limits[Pmax], args.check_cap) // (2 * Pmax * 64) * (2 * Pmax * 64)
        measured = _measure(Pmax, S_check, args, steps=args.check_steps)
        a, b = fits[Pmax]
        check = {**measured, "predicted_mib": a + b * S_check, "predicted_limit": limits[Pmax],
                 "capped": S_check < limits[Pmax] // (2 * Pmax * 64) * (2 * Pmax * 64)}
    single = {r["S"]: r["activation_mib"] for r in rows if r["backend"] != "seqpar"}
    print(f"GPT {args.layers} layers, width {args.width}: activation MiB per rank of one training step "
          f"(seqpar: remat-aware, ffn_chunks={args.ffn_chunks}, {args.inner}; one-thread ranks)")
    print("| S | P | backend | activation MiB/rank | vs 1 process | peak RSS MiB | step s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['activation_mib'] / single[r['S']]:.2f}" if single.get(r["S"]) else "—"
        print(f"| {r['S']} | {r['P']} | {r['backend']} | {r['activation_mib']:.0f} | {ratio} | "
              f"{r['peak_rss_mib']:.0f} | {r['seconds']:.2f} |")
    print(f"\nlinear fit activation MiB = a + b·S, longest S within {args.budget_gib:g} GiB of activations per rank:")
    print("| P | a MiB | b KiB/token | longest S |")
    print("|---|---|---|---|")
    for P, (a, b) in fits.items():
        print(f"| {P} | {a:.0f} | {b * 1024:.2f} | {limits[P] if limits[P] else '—'} |")
    if check:
        print(f"check at P={Pmax}, S={check['S']}{' (capped by --check-cap)' if check['capped'] else ''}: "
              f"measured {check['activation_mib']:.0f} MiB, fit predicts {check['predicted_mib']:.0f} MiB "
              f"(budget {budget:.0f} MiB at the predicted limit S={check['predicted_limit']})")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    plot = _plot(rows, fits, os.path.splitext(args.out)[0] + ".png")
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv), **vars(args)}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "fits": {str(P): {"a_mib": a, "b_mib_per_token": b,
                                                                "longest_S": limits[P]}
                                                        for P, (a, b) in fits.items()},
                   "check": check, "plot": plot}, f, indent=2)
    if os.path.exists(args.out + ".partial"):
        os.remove(args.out + ".partial")
    print(f"wrote {args.out}" + (f" and {plot}" if plot else ""))


if __name__ == "__main__":
    main()
