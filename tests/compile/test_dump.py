"""The dump tool (DESIGN §7): `python -m seqpar_compiler.dump SCRIPT` on the example GPT writes
the documented files for every rank, golden-checked after normalising, and fails clearly.

One dump run (two spawned ranks, aot_eager, the shipped h100-dgx profile so `auto` and the
predicted times are the same on every machine) serves the tests of this module. Regenerate the
goldens with ``EXPECTTEST_ACCEPT=1 python -m pytest tests/compile/test_dump.py``.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import expecttest
import pytest

from seqpar_compiler.dump import main as dump_main

HERE = Path(__file__).parent
SCRIPT = HERE / "scripts" / "train_gpt_two_ranks.py"
GRAPH_GOLDEN = HERE / "expect" / "dump_gpt_rewrite.txt"


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    out = tmp_path_factory.mktemp("dump")
    trace = tmp_path_factory.mktemp("trace")
    env = dict(os.environ, SEQPAR_INNER="aot_eager", SEQPAR_PROFILE="h100-dgx", TORCH_TRACE=str(trace))
    for name in ("SEQPAR_SCHEDULE", "SEQPAR_OVERLAP", "SEQPAR_DUMP"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "seqpar_compiler.dump", "--out", str(out), "--all-ranks",
                           str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "frame": out / "frame-0_0", "trace": trace, "stdout": proc.stdout}


def _normalise(text: str) -> str:
    """No addresses, absolute paths, line numbers of user code or option lists (other issues
    add options) in a golden; ASCII only, as expecttest's inline goldens need."""
    text = re.sub(r"0x[0-9a-f]+", "0x?", text)
    text = re.sub(r"(\w+\.py):\d+", r"\1:N", text)
    text = re.sub(r"/\S+/", ".../", text)
    text = re.sub(r"## options\n.*\n", "", text)
    for uni, ascii_ in (("·", "."), ("→", "->"), ("…", "..."), ("ᵀ", "^T")):
        text = text.replace(uni, ascii_)
    return text


def test_dump_writes_every_documented_file_for_every_rank(dump):
    for rank in (0, 1):
        files = {p.name for p in (dump["frame"] / f"rank{rank}").iterdir()}
        for stage in ("00-dynamo", "01-canonicalize", "02-rewrite"):
            assert {f"{stage}.txt", f"{stage}.py"} <= files
        assert {"summary.txt", "schedule.txt", "schedule.png"} <= files
    assert "frame-0_0/rank0" in dump["stdout"]


def test_summary_and_schedule_of_the_example_gpt_match_the_golden(dump):
    rank0 = dump["frame"] / "rank0"
    text = _normalise((rank0 / "summary.txt").read_text() + "\n" + (rank0 / "schedule.txt").read_text())
    expecttest.assert_expected_inline(text, """\
seqpar dump: frame frame-0_0, rank 0 of 2, S=32

## attention
%y: q f32[2, 4, 32, 16] k/v f32[2, 4, 32, 16], causal; matched from F.scaled_dot_product_attention at models.py:N

## fallbacks (gathered, computed replicated)
none

## collectives inserted
grad all-reduce l_self_modules_wte_parameters_weight_
grad all-reduce l_self_modules_wpe_parameters_weight_
grad all-reduce l_self_modules_blocks_modules_0_modules_ln_1_parameters_weight_
grad all-reduce l_self_modules_blocks_modules_0_modules_ln_1_parameters_bias_
grad all-reduce l_self_modules_blocks_modules_0_modules_attn_modules_c_attn_parameters_weight_
grad all-reduce l_self_modules_blocks_modules_0_modules_attn_modules_c_attn_parameters_bias_
grad all-reduce l_self_modules_blocks_modules_0_modules_attn_modules_c_proj_parameters_weight_
grad all-reduce l_self_modules_blocks_modules_0_modules_attn_modules_c_proj_parameters_bias_
grad all-reduce l_self_modules_blocks_modules_0_modules_ln_2_parameters_weight_
grad all-reduce l_self_modules_blocks_modules_0_modules_ln_2_parameters_bias_
grad all-reduce l_self_modules_blocks_modules_0_modules_mlp_modules_0_parameters_weight_
grad all-reduce l_self_modules_blocks_modules_0_modules_mlp_modules_0_parameters_bias_
grad all-reduce l_self_modules_blocks_modules_0_modules_mlp_modules_2_parameters_weight_
grad all-reduce l_self_modules_blocks_modules_0_modules_mlp_modules_2_parameters_bias_
grad all-reduce l_self_modules_ln_f_parameters_weight_
grad all-reduce l_self_modules_ln_f_parameters_bias_
grad all-reduce l_self_modules_lm_head_parameters_weight_
all-reduce loss

## schedule
zigzag, overlap on (chosen by SCHEDULE=auto on rank 0 with profile h100-dgx)
  why: zigzag predicted fastest at 0.1802 ms per step, next best distflash at 0.1802 ms (imbalance 1.000)
  zigzag/overlap: 0.1802 ms predicted
  ring/overlap: 0.1802 ms predicted
  distflash/overlap: 0.1802 ms predicted
  striped/overlap: 0.1802 ms predicted
  ulysses/overlap: 0.2201 ms predicted
  ulysses/no-overlap: 0.2201 ms predicted
  zigzag/no-overlap: 0.2402 ms predicted
  ring/no-overlap: 0.2402 ms predicted
  distflash/no-overlap: 0.2402 ms predicted
  striped/no-overlap: 0.2402 ms predicted
rank 0 holds [0, 8) + [24, 32)
rank 1 holds [8, 16) + [16, 24)

## ring cost (model)
B=2 Hq=4 Hkv=4 S=32 D=16 causal
per attention call (1 call(s) of this shape per step): FLOPs (4.B.Hq.D per visible pair) / bytes sent, by rank
  forward step 0: r0 69.6kF/16.4kB  r1 69.6kF/16.4kB
  forward step 1: r0 65.5kF/0B  r1 65.5kF/0B
  backward step 0: r0 69.6kF/32.8kB  r1 69.6kF/32.8kB
  backward step 1: r0 65.5kF/16.4kB  r1 65.5kF/16.4kB
total per rank (fwd+bwd): r0 270kF  r1 270kF; forward max/mean 1.000
predicted with profile h100-dgx: 0.06005 ms forward + 0.1201 ms backward per call


       | step 0          | step 1
-------+-----------------+-----------
rank 0 | q0.kv0 53% kv->1 | q0.kv1 50%
rank 1 | q1.kv1 53% kv->0 | q1.kv0 50%

rank 0 holds [0, 8) + [24, 32)
rank 1 holds [8, 16) + [16, 24)
""")


def test_rewritten_graph_listing_of_the_example_gpt_matches_the_golden(dump):
    """Every node with its local shape and placement, after the rewrite pass."""
    text = _normalise((dump["frame"] / "rank0" / "02-rewrite.txt").read_text())
    if os.environ.get("EXPECTTEST_ACCEPT") == "1":
        GRAPH_GOLDEN.parent.mkdir(exist_ok=True)
        GRAPH_GOLDEN.write_text(text)
    assert GRAPH_GOLDEN.exists(), f"no golden {GRAPH_GOLDEN}; run with EXPECTTEST_ACCEPT=1 to write it"
    assert text == GRAPH_GOLDEN.read_text(), "rewritten graph changed; EXPECTTEST_ACCEPT=1 to accept"


def test_every_rank_got_the_same_auto_schedule(dump):
    """`auto` is decided on rank 0 and broadcast: the ranks' summaries name one schedule."""
    chosen = {re.search(r"## schedule\n(\w+), overlap (\w+)", (dump["frame"] / f"rank{r}" / "summary.txt")
                        .read_text()).groups() for r in (0, 1)}
    assert len(chosen) == 1, chosen


def test_sharded_graph_nodes_carry_placements(dump):
    lines = (dump["frame"] / "rank0" / "02-rewrite.txt").read_text().splitlines()
    ops = [ln for ln in lines if "torch.nn.functional.layer_norm" in ln or "torch._C._nn.linear" in ln]
    assert ops and all("Shard(" in ln for ln in ops)
    assert any("torch.ops.seqpar.ring_attention.default" in ln for ln in lines)


def test_schedule_png_is_a_nontrivial_picture(dump):
    import matplotlib.image as mpimg
    import numpy as np
    path = dump["frame"] / "rank0" / "schedule.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(path)
    assert image.shape[0] >= 200 and image.shape[1] >= 300
    colours = np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50                            # cells, text and legend, not a blank canvas


def test_dump_emits_trace_structured_artifacts_for_tlparse(dump):
    logs = "".join(p.read_text(errors="replace") for p in dump["trace"].rglob("*") if p.is_file())
    for name in ("seqpar_summary_txt", "seqpar_schedule_txt", "seqpar_02-rewrite_txt"):
        assert name in logs


def test_dump_tool_exits_2_with_a_clear_message_for_a_missing_script(tmp_path, capsys):
    assert dump_main(["--out", str(tmp_path), str(tmp_path / "nope.py")]) == 2
    assert "no such script" in capsys.readouterr().err


def test_dump_tool_exits_nonzero_naming_the_script_when_it_raises(tmp_path, capsys):
    script = tmp_path / "boom.py"
    script.write_text("raise RuntimeError('boom')\n")
    code = dump_main(["--out", str(tmp_path / "d"), str(script)])
    assert code != 0
    err = capsys.readouterr().err
    assert "boom.py failed (exit status 1" in err
