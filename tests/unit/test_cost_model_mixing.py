"""The cost of sequence-mixing ops: halo and carry traffic per layout, and ``auto``'s layout choice
for a graph that has them."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqpar_compiler.cost_model import AttentionSpec, choose_schedule
from seqpar_compiler.cost_model_mixing import MixingSpec, describe, layout_ok, mixing_specs, traffic
from seqpar_compiler.passes.causal_conv import fuse_padded_convolutions
from seqpar_compiler.profile import load_profile

S, P = 4096, 4


def test_causal_conv_halo_is_k_minus_1_rows_per_run_and_its_gradient_goes_back():
    conv = MixingSpec("halo", "padded_conv1d", S, row_bytes=2 * 64 * 4, left=3)
    ring, zigzag = traffic(conv, "ring", P), traffic(conv, "zigzag", P)
    assert (ring.rows, ring.bytes_forward, ring.bytes_backward) == (3, 3 * 512, 3 * 512)
    assert zigzag.rows == 6                       # two runs, each after a chunk on another rank
    assert ring.saved_bytes == (S // P + 3) * 512 and zigzag.saved_bytes == (S // P + 6) * 512


def test_scan_carries_every_other_ranks_run_totals():
    scan = MixingSpec("scan", "cumsum", S, row_bytes=16)
    assert traffic(scan, "ring", P).rows == P - 1 and traffic(scan, "zigzag", P).rows == 2 * (P - 1)


def test_striped_cannot_run_a_halo_or_scan_sharded():
    for kind in ("halo", "scan"):
        spec = MixingSpec(kind, "op", S, 16, left=3)
        assert not layout_ok(spec, "striped", P) and layout_ok(spec, "zigzag", P)
        assert "gathered" in describe(spec, "striped", P)
    assert layout_ok(MixingSpec("shift", "roll", S, 16, left=1), "striped", P)


def test_auto_never_picks_striped_for_a_graph_with_a_causal_conv():
    profile = load_profile("h100-dgx")
    attn = [AttentionSpec(B=1, Hq=8, Hkv=8, S=S, D=64, causal=True)]
    conv = (MixingSpec("halo", "padded_conv1d", S, row_bytes=2 * 1024 * 2, left=3),)
    _, _, totals = choose_schedule(attn, P, profile, (True,), conv)
    assert all(s != "striped" for s, _ in totals)
    plain = choose_schedule(attn, P, profile, (True,))[2]
    assert any(s == "striped" for s, _ in plain)
    assert totals["zigzag", True] > plain["zigzag", True]     # the halo costs something


class _Hybrid(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 4, groups=4, padding=3)

    def forward(self, x):                       # x [B, S, C]
        h = self.conv(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2)
        return h.cumsum(1) + torch.roll(x, 1, 1)


def test_mixing_specs_read_from_the_graph():
    seen = {}

    def capture(gm, example_inputs):
        fuse_padded_convolutions(gm)
        seen["specs"] = mixing_specs(gm, 16)
        return gm
    torch.compile(_Hybrid(), backend=capture)(torch.randn(2, 16, 4))
    kinds = sorted((m.kind, m.op, m.left) for m in seen["specs"])
    assert kinds == [("halo", "padded_conv1d", 3), ("scan", "cumsum", 0), ("shift", "roll", 1)]


def test_a_carried_recurrence_is_one_state_per_hop_on_contiguous_layouts_only():
    """A chunked GLA collapsed into a carried recurrence (``passes/recurrences.py``): the cost
    model reads its state's bytes, and ``auto`` keeps to a contiguous layout for it."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
    from fla_modules import chunk_simple_gla
    from seqpar_compiler.passes.recurrences import _PROVED, collapse_recurrences
    from seqpar_compiler.runtime.recurrence_op import body_of
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=g, dtype=torch.float64) for _ in range(3))
    gate = F.logsigmoid(torch.randn(1, 2, 64, generator=g, dtype=torch.float64)) / 4
    seen = {}

    def capture(gm, example_inputs):
        keys = collapse_recurrences(gm, 64, 2)
        seen["specs"], seen["key"] = mixing_specs(gm, 64), keys[0]
        return gm
    torch._dynamo.reset()
    torch.compile(lambda *a: chunk_simple_gla(*a, 16, 0.5), backend=capture, fullgraph=True)(q, k, v, gate)
    (spec,) = seen["specs"]
    body = body_of(_PROVED[seen["key"]].local)
    assert spec.kind == "state" and spec.row_bytes == torch.zeros(body.state_shape, dtype=body.state_dtype).nbytes
    assert layout_ok(spec, "ring", 2) and not layout_ok(spec, "zigzag", 2)
    t = traffic(spec, "ring", 4)
    assert (t.rows, t.bytes_forward, t.messages) == (1, spec.row_bytes, 1)
    assert "3 hops in sequence" in describe(spec, "ring", 4) and "gathered" in describe(spec, "zigzag", 4)
    profile = load_profile("h100-dgx")
    attn = [AttentionSpec(B=1, Hq=8, Hkv=8, S=4096, D=64, causal=True)]
    big = MixingSpec("state", "carried_recurrence", 4096, spec.row_bytes)
    schedule, _, totals = choose_schedule(attn, 4, profile, (True,), (big,))
    assert schedule in ("ring", "distflash", "ulysses") and ("zigzag", True) not in totals
