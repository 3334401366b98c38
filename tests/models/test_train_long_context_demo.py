"""examples/train_long_context.py runs end to end at a tiny size (the README's main command).

One run of the real script (2 spawned gloo ranks, aot_eager so no inductor compile, S = 256,
3 steps); the properties checked are the ones a user relies on: it exits 0, its first step agrees
with single-process eager, and it writes a summary and a loss curve. Whether the task is *learned*
needs the full size and is the script's own success check (`--no-check-success` turns it off here).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parents[2] / "examples" / "train_long_context.py"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_long_context")
    env = {**os.environ, "SEQPAR_INNER": "aot_eager"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--context", "256", "--steps", "3", "--ranks", "2",
                           "--eval-batches", "1", "--no-check-success", "--out", str(out)],
                          capture_output=True, text=True, timeout=280, env=env)
    return proc, out


def test_demo_exits_zero_at_a_tiny_size(tiny_run):
    proc, _ = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_demo_first_step_matches_single_process_eager(tiny_run):
    _, out = tiny_run
    check = json.loads((out / "summary.json").read_text())["first_step_check"]
    assert check["loss_rel_err"] <= 1e-5 and check["max_grad_rel_err"] <= 1e-4, check


def test_demo_writes_summary_and_loss_curve(tiny_run):
    _, out = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["context"] == 256 and summary["ranks"] == 2 and len(summary["history"]) == 3
    assert {"second_half_loss", "accuracy"} <= set(summary["eval"]) and "criterion" in summary
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_a_context_it_cannot_split():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--context", "1000"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--context must be a positive multiple of 16" in proc.stderr
