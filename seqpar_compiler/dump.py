"""See what the compiler did: ``python -m seqpar_compiler.dump SCRIPT [ARGS...]`` (docs/architecture.md).

Runs the user's script (as ``python SCRIPT ARGS``, so scripts that spawn ranks work unchanged)
with ``SEQPAR_DUMP=DIR``; the backend then writes, per compiled frame, for group rank 0 (every
rank with ``--all-ranks``), into ``DIR/frame-<dynamo compile id>/rank<r>/``:

  00-dynamo.txt, 01-canonicalize.txt, 02-rewrite.txt   the graph before/after each pass: one
      line per node with its shape and placement (Shard(dim) / Replicate); ``*.py`` beside
      each is ``print_readable`` of the same graph
  summary.txt       attention found and what it was matched from, fallbacks (op, source line,
                    why), collectives inserted, the schedule chosen (and auto's candidates),
                    per-rank FLOPs and bytes per ring step, predicted attention time
  schedule.txt, schedule.png   the ring schedule: one row per rank, one column per step

Each file is also emitted as a ``torch._logging.trace_structured`` artifact, so ``TORCH_TRACE``
+ tlparse show the same. The dump tool exits non-zero when the script is missing or fails.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.fx as fx

__all__ = ["DumpRecorder", "graph_listing", "record_sharded", "main"]


def _shape(value) -> str:
    if isinstance(value, torch.Tensor):
        dtype = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16",
                 torch.int64: "i64", torch.int32: "i32", torch.bool: "b8"}.get(value.dtype, str(value.dtype))
        return f"{dtype}{list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shape(v) for v in value) + ")"
    return "-" if value is None else type(value).__name__


def _target(node: fx.Node) -> str:
    if node.op in ("placeholder", "output"):
        return node.op
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "get_attr":
        return f"get_attr {node.target}"
    return fx.node._get_qualified_name(node.target) if callable(node.target) else str(node.target)


def _arg(a) -> str:
    text = str(fx.node.map_arg(a, lambda n: f"%{n.name}"))
    return text if len(text) <= 60 else text[:57] + "..."


def _source_line(node: fx.Node) -> str:
    """``file.py:line`` of the user code a node came from (basename only: dumps are shared)."""
    for line in reversed((node.meta.get("stack_trace") or "").strip().splitlines()):
        line = line.strip()
        if line.startswith("File"):
            parts = line.split('"')
            lineno = line.split("line ")[-1].split(",")[0] if "line " in line else "?"
            return f"{os.path.basename(parts[1]) if len(parts) > 1 else '?'}:{lineno}"
    return f"graph node {node.name}"


def graph_listing(gm: fx.GraphModule, shapes: dict | None = None) -> str:
    """One line per node: name, shape (Dynamo's example value, or ``shapes``), placement, op(args)."""
    rows = []
    for n in gm.graph.nodes:
        value = shapes.get(n) if shapes is not None and n in shapes else n.meta.get("example_value")
        placement = n.meta.get("seqpar_placement")
        args = ", ".join([_arg(a) for a in n.args] + [f"{k}={_arg(v)}" for k, v in n.kwargs.items()])
        if isinstance(placement, tuple):
            placement = "(" + ", ".join(map(str, placement)) + ")"
        rows.append((f"%{n.name}", _shape(value), "-" if placement is None else str(placement),
                     f"{_target(n)}({args})" if n.op != "placeholder" else "placeholder"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows) + "\n"


def _local_shapes(gm: fx.GraphModule, example_inputs) -> dict:
    """Shapes of every node of the sharded graph (local shapes), by running it on fake tensors;
    the graph itself is left untouched (no meta written)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    shapes = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            shapes[n] = out
            return out
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
        with mode:
            _Recorder(gm).run(*fake)
    except Exception:  # noqa: BLE001 - shapes are a courtesy; the listing shows what was found
        pass
    return shapes


class DumpRecorder:
    """Writes one compiled frame's dump; the backend calls it at each stage."""

    def __init__(self, root: str, rank: int, P: int):
        from torch._guards import CompileContext
        compile_id = str(CompileContext.current_compile_id() or "0").replace("/", "_")
        self.dir = Path(root) / f"frame-{compile_id}" / f"rank{rank}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.P = rank, P
        self.sections: list[tuple[str, str]] = []
        self._stage = 0

    @classmethod
    def maybe(cls, opts: dict, rank: int, P: int) -> "DumpRecorder | None":
        if not opts.get("dump") or (rank != 0 and not opts.get("dump_all_ranks")):
            return None
        return cls(opts["dump"], rank, P)

    def write(self, name: str, text: str) -> None:
        (self.dir / name).write_text(text)
        torch._logging.trace_structured(
            "artifact", metadata_fn=lambda: {"name": f"seqpar_{name.replace('.', '_')}", "encoding": "string"},
            payload_fn=lambda: text)

    def graph(self, stage: str, gm: fx.GraphModule, example_inputs=None) -> None:
        shapes = _local_shapes(gm, example_inputs) if example_inputs is not None else None
        name = f"{self._stage:02d}-{stage}"
        self._stage += 1
        self.write(f"{name}.txt", graph_listing(gm, shapes))
        self.write(f"{name}.py", gm.print_readable(print_output=False, include_stride=False, colored=False))

    def section(self, title: str, lines: list[str]) -> None:
        self.sections.append((title, "\n".join(lines) if lines else "none"))

    def finish(self, header: str) -> None:
        body = "\n\n".join(f"## {t}\n{b}" for t, b in self.sections)
        self.write("summary.txt", f"{header}\n\n{body}\n")


def _attention_lines(attention: list[fx.Node]) -> list[str]:
    """Each attention node, its shapes and mask, and what it was matched from."""
    from seqpar_compiler.passes.attention_patterns import canonical_attention, canonical_spec
    lines = []
    for n in attention:
        q = n.args[0].meta.get("example_value") if isinstance(n.args[0], fx.Node) else None
        k = n.args[1].meta.get("example_value") if isinstance(n.args[1], fx.Node) else None
        shapes = f"q {_shape(q)} k/v {_shape(k)}"
        src = (n.meta.get("source_fn_stack") or [("?", None)])[-1][0]
        if n.target is canonical_attention:
            spec = canonical_spec(n)
            band = (f"window {spec.window}" if spec.window is not None else "causal" if spec.causal
                    else f"band [-{spec.behind}, {spec.ahead}]" if spec.positional else None)
            kinds = [k for k, on in ((band, band is not None), ("same-document", spec.docs),
                                     ("key padding", spec.key_padding)) if on] or ["no mask"]
            origin = ("F.scaled_dot_product_attention with an explicit mask" if "scaled_dot_product" in str(src)
                      else "hand-written softmax(q·kᵀ·s + mask)·v")
            lines.append(f"%{n.name}: {shapes}, mask proved {' & '.join(kinds)}; matched from {origin} "
                         f"at {_source_line(n)}")
        else:
            causal = n.kwargs.get("is_causal", n.args[5] if len(n.args) > 5 else False)
            has_mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None) is not None
            what = "an unproved explicit mask (falls back)" if has_mask else ("causal" if causal else "no mask")
            lines.append(f"%{n.name}: {shapes}, {what}; matched from F.scaled_dot_product_attention "
                         f"at {_source_line(n)}")
    return lines


def _fmt_flops(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _cost_lines(pred, calls: int) -> list[str]:
    """Per-rank FLOPs and bytes sent at each step of one call, forward then backward."""
    lines = [f"per attention call ({calls} call(s) of this shape per step): FLOPs (4·B·Hq·D per visible pair) / "
             f"bytes sent, by rank"]
    for direction, steps in (("forward", pred.forward), ("backward", pred.backward)):
        for t, st in enumerate(steps):
            cells = [f"r{r} {_fmt_flops(st.flops[r])}F/{_fmt_flops(st.bytes_sent[r])}B" for r in range(pred.P)]
            lines.append(f"  {direction} step {t}: " + "  ".join(cells))
    flops = pred.rank_flops()
    lines.append(f"total per rank (fwd+bwd): " + "  ".join(f"r{r} {_fmt_flops(f)}F" for r, f in enumerate(flops))
                 + f"; forward max/mean {pred.imbalance:.3f}")
    return lines


def record_sharded(rec: DumpRecorder, *, S: int, P: int, schedule: str, overlap: bool, attention: list,
                   ctx, decision, profile_name: str | None, options: dict, mixing: list = ()) -> None:
    """The summary sections, the schedule table and picture of one sharded frame."""
    from .auto_schedule import attention_specs
    from .cost_model import predict
    from .profile import Profile, load_profile
    from .schedule_picture import draw_schedule, holdings_legend, schedule_table
    rec.section("attention", _attention_lines(attention))
    rec.section("fallbacks (gathered, computed replicated)", [f"{op} at {line}: {why}" for op, line, why in
                                                             ctx.fallbacks])
    rec.section("collectives inserted", list(ctx.collectives))
    if mixing:
        from .cost_model_mixing import describe
        rec.section("sequence mixing (halo and carry per step, busiest rank)", [describe(m, schedule, P) for m in mixing])
    how = "fixed by SEQPAR_SCHEDULE / backend(schedule=)"
    lines = []
    if decision is not None:
        how = f"chosen by SCHEDULE=auto on rank 0 with profile {decision['profile']}"
        lines = [f"  why: {decision['why']}"] * ("why" in decision) + [f"  {name}: {seconds * 1e3:.4g} ms predicted" for name, seconds in
                 sorted(decision["candidates"].items(), key=lambda kv: kv[1])]
    from .ulysses_api import describe_all_to_all
    a2a = describe_all_to_all(schedule, P, options.get("ulysses_degree"), decision is not None)
    rec.section("schedule", [f"{schedule}, overlap {'on' if overlap else 'off'} ({how})"] + [f"  {a2a}"] * bool(a2a)
                + lines + holdings_legend(schedule, P, S))
    specs = attention_specs(attention)
    if not specs:
        return
    try:
        profile = load_profile(profile_name)          # what auto used on rank 0; never calibrates here
    except ValueError:
        profile = None
    counted = profile or Profile(name="none", flops_per_second=1.0, backward_ratio=1.0, bandwidth=1.0)
    groups: dict = {}
    for spec in specs:
        groups[spec] = groups.get(spec, 0) + 1
    cost = []
    for spec, calls in groups.items():
        pred = predict(spec, schedule, P, counted, overlap=overlap)
        cost.append(f"B={spec.B} Hq={spec.Hq} Hkv={spec.Hkv} S={spec.S} D={spec.D} "
                    f"{'causal' if spec.causal else 'no mask'}{f' window {spec.window}' if spec.window else ''}")
        cost += _cost_lines(pred, calls)
        if profile is not None:
            cost.append(f"predicted with profile {profile.name}: {pred.forward_seconds * 1e3:.4g} ms forward + "
                        f"{pred.backward_seconds * 1e3:.4g} ms backward per call")
        else:
            cost.append("no cost-model profile at hand (SEQPAR_PROFILE unset, none cached): times not predicted")
    rec.section("ring cost (model)", cost)
    first = predict(specs[0], schedule, P, counted, overlap=overlap)
    rec.write("schedule.txt", schedule_table(first) + "\n\n" + "\n".join(holdings_legend(schedule, P, S)) + "\n")
    draw_schedule(first, str(rec.dir / "schedule.png"))
    rec.section("options", [" ".join(f"{k}={v}" for k, v in sorted(options.items())
                                     if k not in ("dump", "dump_all_ranks", "auto_overlap", "lengths_seen"))])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="seqpar-dump", description="Run SCRIPT with SEQPAR_DUMP set and write what "
                                 "the seqpar compiler did (graphs, schedule, fallbacks, costs).")
    ap.add_argument("--out", default="seqpar_dump", help="folder to write (default: ./seqpar_dump)")
    ap.add_argument("--all-ranks", action="store_true", help="dump every rank, not only rank 0")
    ap.add_argument("script", help="the Python script to run")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.script):
        print(f"seqpar-dump: no such script: {args.script}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, SEQPAR_DUMP=out, SEQPAR_DUMP_ALL_RANKS="1" if args.all_ranks else "0")
    code = subprocess.call([sys.executable, args.script, *args.args], env=env)
    if code != 0:
        print(f"seqpar-dump: {args.script} failed (exit status {code}; its traceback is above); "
              f"the dump in {out} may be partial", file=sys.stderr)
        return code if code > 0 else 1
    frames = sorted(str(p.relative_to(out)) for p in Path(out).glob("frame-*/rank*"))
    if not frames:
        print(f"seqpar-dump: {args.script} ran, but nothing was compiled with backend='seqpar' on a process "
              f"group, so {out} is empty", file=sys.stderr)
        return 0
    print(f"seqpar-dump: wrote {len(frames)} frame dump(s) to {out}: {', '.join(frames)} "
          f"(start with summary.txt and schedule.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
