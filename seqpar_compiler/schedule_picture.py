"""The ring schedule drawn for people: a text table and a PNG, one row per rank, one column per
step (docs/architecture.md). Built from the same plan the ring runs (``runtime/plan.py``) and the cost
model's per-step figures, so the picture cannot disagree with what runs.

Each cell says which block the rank computes: ``q2·kv0`` = the queries rank 2 holds against
the keys/values rank 0 holds (the legend lists which tokens each rank holds under the
schedule), the share of that block's (query, key) pairs the mask leaves visible, and what the
rank sends during the step (``kv→1``: its KV block to rank 1; ``q→0``: its queries to a helper;
``res→3``: a helper's results). Empty cells are idle slots.
"""
from __future__ import annotations

from seqpar_compiler.kernels import AttentionSpec as _Visibility
from seqpar_compiler.runtime import build_plan, local_segments

from .cost_model import Prediction, _block_cost

__all__ = ["schedule_cells", "schedule_table", "draw_schedule", "holdings_legend"]


def holdings_legend(schedule: str, P: int, S: int) -> list[str]:
    """Which global tokens each rank holds, one line per rank."""
    lines = []
    for r in range(P):
        segs = local_segments(schedule, r, P, S // P)
        parts = [f"{s.start}, {s.start + s.stride}, …, {s.start + (s.count - 1) * s.stride}" if s.stride > 1
                 else f"[{s.start}, {s.start + s.count})" for s in segs]
        lines.append(f"rank {r} holds {' + '.join(parts)}")
    return lines


def schedule_cells(pred: Prediction) -> list[list[dict]]:
    """cells[rank][step] of the forward: {"blocks": [(q owner, kv owner, visible share)],
    "sends": [str], "help": bool, "flops": int, "bytes": int}."""
    spec, P = pred.spec, pred.P
    S_local = spec.S // P
    plan = build_plan(pred.schedule, P, S_local, _Visibility.of(causal=spec.causal, window=spec.window))
    cells = [[None] * plan.num_steps for _ in range(P)]
    for t, row in enumerate(plan.steps):
        for r, st in enumerate(row):
            blocks = []
            for qi, kj, helped in ([(r, st.holds, False)] if st.compute_own else []) + \
                                  ([(st.help_q, r, True)] if st.help_q is not None else []):
                visible = _block_cost(pred.schedule, P, S_local, qi, kj, spec.causal, spec.window, "visible", 0.0)[0]
                blocks.append((qi, kj, visible / (S_local * S_local), helped))
            sends = []
            if st.forward_kv:
                sends.append(f"kv→{(r + 1) % P}")
            if st.q_to is not None:
                sends.append(f"q→{st.q_to}")
            if st.help_q is not None:
                sends.append(f"res→{st.help_q}")
            step = pred.forward[t]
            cells[r][t] = {"blocks": blocks, "sends": sends, "flops": step.flops[r], "bytes": step.bytes_sent[r]}
    return cells


def _cell_text(cell: dict) -> str:
    parts = [f"{'help ' if h else ''}q{qi}·kv{kj} {100 * share:.0f}%" for qi, kj, share, h in cell["blocks"]]
    text = ", ".join(parts) or "idle"
    return text + (" " + " ".join(cell["sends"]) if cell["sends"] else "")


def schedule_table(pred: Prediction) -> str:
    """The forward schedule as a text table (the backward runs the same steps; dK/dV
    accumulators follow the KV blocks one hop behind)."""
    cells = schedule_cells(pred)
    steps = len(cells[0])
    rows = [[f"rank {r}"] + [_cell_text(c) for c in cells[r]] for r in range(pred.P)]
    header = ["", *[f"step {t}" for t in range(steps)]]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    fmt = lambda row: " | ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip()    # noqa: E731
    lines = [fmt(header), "-+-".join("-" * w for w in widths)] + [fmt(row) for row in rows]
    return "\n".join(lines)


def draw_schedule(pred: Prediction, path: str, *, title: str = "") -> None:
    """Save the schedule picture (PNG): rows ranks, columns steps, shaded by the block's
    visible share, helper work in orange, idle slots hatched, sends written under the block."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    cells = schedule_cells(pred)
    P, steps = pred.P, len(cells[0])
    fig_w, fig_h = 2.0 + 2.3 * steps, 1.6 + 0.9 * P
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=110)
    for r in range(P):
        for t in range(steps):
            cell, y = cells[r][t], P - 1 - r
            if not cell["blocks"]:
                ax.add_patch(Rectangle((t, y), 1, 1, facecolor="#f2f2f2", edgecolor="#999999", hatch="//"))
                ax.text(t + 0.5, y + 0.55, "idle", ha="center", va="center", fontsize=9, color="#777777")
            else:
                h = 1.0 / len(cell["blocks"])
                for i, (qi, kj, share, helped) in enumerate(cell["blocks"]):
                    color = (0.95, 0.55, 0.1) if helped else (0.15, 0.4, 0.8)
                    alpha = 0.25 + 0.75 * min(1.0, share)
                    ax.add_patch(Rectangle((t, y + 1 - (i + 1) * h), 1, h, facecolor=color, alpha=alpha,
                                           edgecolor="white", linewidth=2))
                    label = f"{'help ' if helped else ''}q{qi}·kv{kj}\n{100 * share:.0f}% visible"
                    ax.text(t + 0.5, y + 1 - (i + 0.5) * h + 0.08, label, ha="center", va="center", fontsize=8.5)
            if cell["sends"]:
                ax.text(t + 0.5, y + 0.12, "  ".join(cell["sends"]), ha="center", va="center", fontsize=7.5,
                        color="#333333")
    ax.set_xlim(0, steps)
    ax.set_ylim(0, P)
    ax.set_xticks([t + 0.5 for t in range(steps)], [f"step {t}" for t in range(steps)])
    ax.set_yticks([P - 1 - r + 0.5 for r in range(P)], [f"rank {r}" for r in range(P)])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    spec = pred.spec
    mask = "causal" if spec.causal and spec.window is None else f"window {spec.window}" if spec.window else "no mask"
    ax.set_title(title or f"{pred.schedule} schedule, P={P}, S={spec.S}, {mask} "
                          f"(max/mean work {pred.imbalance:.3f})", fontsize=11)
    ax.legend(handles=[Patch(facecolor=(0.15, 0.4, 0.8), label="own queries"),
                       Patch(facecolor=(0.95, 0.55, 0.1), label="helping another rank"),
                       Patch(facecolor="#f2f2f2", hatch="//", edgecolor="#999999", label="idle")],
              loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, fontsize=8, frameon=False)
    fig.text(0.01, 0.01, "   ".join(holdings_legend(pred.schedule, P, spec.S)), fontsize=7, color="#444444")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)
    plt.close(fig)
