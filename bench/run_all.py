"""Run every benchmark in bench/ and write bench/results/summary.md.

    python bench/run_all.py                  # full size: each script's own defaults (long: many minutes)
    python bench/run_all.py --quick          # small sizes, to check that every script runs
    python bench/run_all.py --collect-only   # no runs: rebuild summary.md from the JSON already there
    python bench/run_all.py --only ring_attention,train_step

Scripts are discovered (every ``bench/*.py`` but this one), so a benchmark added later is run
without editing this file. A quick run passes the script's ``--quick`` flag (else ``--small``,
else it runs at its defaults, said in the summary) and writes ``<name>.quick.json`` and
``summary.quick.md``, so quick numbers never overwrite the full-size results the docs quote.
A script that exits non-zero (``kernels_gpu.py`` without a CUDA GPU) is listed with the last
lines it printed instead of a table.

Each benchmark's JSON is rendered generically: its ``meta`` (machine, date, command) as a line,
and every top-level list of records as a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def discover() -> list[str]:
    """Benchmark names (file stems), sorted."""
    return sorted(f[:-3] for f in os.listdir(HERE)
                  if f.endswith(".py") and f != os.path.basename(__file__) and not f.startswith("_"))


def _flags(name: str) -> set[str]:
    with open(os.path.join(HERE, f"{name}.py")) as f:
        return set(re.findall(r'"(--[a-z][a-z0-9-]*)"', f.read()))


def command_for(name: str, quick: bool) -> tuple[list[str], str, str]:
    """(argv, the JSON it writes, a note) for one benchmark at the chosen size."""
    flags = _flags(name)
    cmd = [sys.executable, os.path.join("bench", f"{name}.py")]
    note = ""
    if quick:
        size = "--quick" if "--quick" in flags else "--small" if "--small" in flags else None
        if size:
            cmd.append(size)
        else:
            note = "no quick flag: ran at its defaults"
    out = os.path.join(RESULTS, f"{name}{'.quick' if quick else ''}.json")
    if "--out" in flags:
        cmd += ["--out", os.path.relpath(out, os.path.dirname(HERE))]      # runs from the repo root
    elif quick:
        out = os.path.join(RESULTS, f"{name}.json")      # cannot redirect: read where it writes
    return cmd, out, note


def run_one(name: str, quick: bool, timeout: float) -> dict:
    cmd, out, note = command_for(name, quick)
    shown = " ".join(["python"] + [os.path.relpath(c, os.getcwd()) if c.startswith(HERE) else c for c in cmd[1:]])
    print(f"== {name}: {shown}", flush=True)
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", f"no result within {timeout:.0f} s\n{(e.stdout or b'')[-2000:]!r}"
    seconds = time.time() - start
    fresh = rc == 0 and os.path.exists(out) and os.path.getmtime(out) >= start - 1
    print(f"   {'ok' if fresh else f'exit {rc}'} in {seconds:.0f} s", flush=True)
    return {"name": name, "command": shown, "rc": rc, "seconds": seconds, "json": out if fresh else None,
            "tail": "\n".join(text.strip().splitlines()[-6:]), "note": note}


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))[:60]
    return str(v)


def render_json(path: str) -> list[str]:
    """Markdown for one benchmark JSON: a meta line, then one table per list of records."""
    with open(path) as f:
        data = json.load(f)
    lines = []
    meta = data.get("meta") if isinstance(data, dict) else None
    if meta:
        lines.append("Machine: {}; {} CPUs; torch {}; date {}; command `{}`.".format(
            meta.get("machine", "?"), meta.get("cpus", "?"), meta.get("torch", "?"), meta.get("date", "?"),
            meta.get("command", "?")))
    elif isinstance(data, dict):
        extra = {k: v for k, v in data.items() if not isinstance(v, (list, dict))}
        if extra:
            lines.append("; ".join(f"{k}: {v}" for k, v in extra.items()) + ".")
    tables = data.items() if isinstance(data, dict) else [("rows", data)]
    for key, value in tables:
        if not (isinstance(value, list) and value and all(isinstance(r, dict) for r in value)):
            continue
        if all(all(isinstance(v, (dict, list)) for v in r.values()) for r in value):
            # raw per-rank records (a dict of results per rank): no table; they stay in the JSON
            lines += ["", f"`{key}`: {len(value)} nested records, in the JSON"]
            continue
        cols = list(dict.fromkeys(c for r in value for c in r))
        lines += ["", f"`{key}`:" if key != "rows" else "", "| " + " | ".join(cols) + " |",
                  "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in value]
    return [ln for i, ln in enumerate(lines) if ln or (i and lines[i - 1])]


def write_summary(names: list[str], runs: dict, quick: bool, path: str, collect_only: bool = False) -> None:
    how = "--collect-only" if collect_only else "--quick" if quick else ""
    lines = ["# Benchmark summary", "",
             f"Written by `python bench/run_all.py{' ' + how if how else ''}` on "
             f"{platform.platform()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d %H:%M %Z')}. "
             f"Each section says the machine, date and command of the run that produced its numbers "
             f"(from the benchmark's JSON in `bench/results/`).", ""]
    for name in names:
        run = runs.get(name)
        json_path = run["json"] if run else os.path.join(RESULTS, f"{name}{'.quick' if quick else ''}.json")
        lines.append(f"## {name}")
        lines.append("")
        if run and run["note"]:
            lines += [f"Note: {run['note']}.", ""]
        if json_path and os.path.exists(json_path):
            lines += render_json(json_path)
        elif run:
            lines += [f"`{run['command']}` exited with {run['rc']} and wrote no results:", "", "```",
                      run["tail"], "```"]
        else:
            lines.append(f"No results yet: run `python bench/{name}.py`.")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {os.path.relpath(path)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (each script's --quick or --small)")
    ap.add_argument("--collect-only", action="store_true", help="run nothing; summarise the JSON present")
    ap.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per benchmark")
    args = ap.parse_args(argv)
    names = discover()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            ap.error(f"unknown benchmark(s) {', '.join(unknown)}; found: {', '.join(names)}")
        names = wanted
    runs = {} if args.collect_only else {n: run_one(n, args.quick, args.timeout) for n in names}
    os.makedirs(RESULTS, exist_ok=True)
    write_summary(names, runs, args.quick, os.path.join(RESULTS, f"summary{'.quick' if args.quick else ''}.md"),
                  args.collect_only)
    failed = [n for n, r in runs.items() if r["json"] is None]
    if failed:
        print(f"no results from: {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
