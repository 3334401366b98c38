"""Sequence-mixing ops in one process: the fetch maps of the layouts, the sharding core's plans
(which op runs, which layouts are refused), the graph rewrite that makes a padded convolution one
op, and that op's gradient."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqpar_compiler.passes.causal_conv import fuse_padded_convolutions
from seqpar_compiler.runtime.sequence_fetch import fetch_map, fetched_rows_from_others, halo_kind, needed_positions
from seqpar_compiler.runtime.sequence_mixing import padded_conv1d_op
from seqpar_compiler.runtime.sharding.ops import Refusal, TensorArg, plan_op
from seqpar_compiler.runtime.sharding.placements import Replicate, Shard

aten = torch.ops.aten


def test_zigzag_halo_of_the_second_chunk_comes_from_the_next_rank():
    # P=2, S=8: rank 0 holds chunks 0 and 3 ([0,1], [6,7]); chunk 3's halo is chunk 2, on rank 1
    assert needed_positions(halo_kind(2, 0), "zigzag", 0, 2, 8) == [-1, -1, 4, 5]
    assert fetch_map(halo_kind(2, 0), "zigzag", 0, 2, 8).recv == {1: (2, 3)}


@pytest.mark.parametrize("schedule", ["ring", "zigzag"])
def test_causal_halo_moves_k_minus_1_rows_per_run_start_past_zero(schedule):
    P, S, k = 4, 32, 4
    # runs whose preceding chunk lies on another rank (zigzag's last rank holds both middle chunks)
    runs_not_first = {"ring": [0, 1, 1, 1], "zigzag": [1, 2, 2, 1]}[schedule]
    for rank in range(P):
        assert fetched_rows_from_others(halo_kind(k - 1, 0), schedule, rank, P, S) == (k - 1) * runs_not_first[rank]


def test_flip_on_zigzag_crosses_no_rank():
    assert all(not fetch_map("flip", "zigzag", r, 4, 32).recv for r in range(4))
    assert all(fetch_map("flip", "ring", r, 4, 32).recv for r in range(4))


def _plan(op, args, S=16, P=2, schedule="ring", out=None):
    return plan_op(op, args, {}, S=S, P=P, group_name="g", out_shapes=(out,), schedule=schedule)


def test_same_length_convolution_plans_a_halo_exchange():
    x = TensorArg((2, 8, 16), torch.float64, Shard(2))
    w = TensorArg((8, 1, 5), torch.float64, Replicate())
    plan = _plan(aten.convolution.default, (x, w, None, [1], [2], [1], False, [0], 8), out=(2, 8, 16))
    assert plan.call is torch.ops.seqpar.halo_conv1d.default and plan.outputs == (Shard(2),)
    assert plan.args[3:5] == (2, 2)


def test_convolution_that_changes_the_length_is_refused():
    x = TensorArg((2, 8, 16), torch.float64, Shard(2))
    w = TensorArg((8, 1, 4), torch.float64, Replicate())
    with pytest.raises(Refusal):
        _plan(aten.convolution.default, (x, w, None, [1], [3], [1], False, [0], 8), out=(2, 8, 19))


@pytest.mark.parametrize("op,args", [
    (torch.ops.seqpar.padded_conv1d.default, "conv"), (aten.cumsum.default, "scan")])
def test_striped_layout_refuses_halo_and_scan(op, args):
    x = TensorArg((2, 8, 16), torch.float64, Shard(2))
    w = TensorArg((8, 1, 4), torch.float64, Replicate())
    full = (x, w, None, 3, 0, 1, 8) if args == "conv" else (x, 2)
    with pytest.raises(Refusal, match="striped"):
        _plan(op, full, schedule="striped", out=(2, 8, 16))


def test_roll_along_the_sequence_fetches_and_refuses_two_dims_at_once():
    x = TensorArg((2, 16, 8), torch.float64, Shard(1))
    plan = _plan(aten.roll.default, (x, [3], [1]), out=(2, 16, 8))
    assert plan.call is torch.ops.seqpar.sequence_fetch.default and plan.args[2] == "shift:3:1"
    with pytest.raises(Refusal):
        _plan(aten.roll.default, (x, [1, 1], [1, 2]), out=(2, 16, 8))


def test_scan_plans_the_carry_op():
    x = TensorArg((2, 16, 8), torch.float64, Shard(1))
    plan = _plan(aten.logcumsumexp.default, (x, 1), schedule="zigzag", out=(2, 16, 8))
    assert plan.call is torch.ops.seqpar.sequence_scan.default and plan.args[2] == "logcumsumexp"


class _Both(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(4, 4, 3, groups=4, padding=2)
        self.b = nn.Conv1d(4, 4, 3)

    def forward(self, x):
        return self.a(x)[..., :x.shape[-1]] + self.b(F.pad(x, (2, 0)))


def test_pad_then_conv_and_conv_then_slice_become_one_op_each():
    model = _Both().double()
    seen = {}

    def capture(gm, example_inputs):
        seen["count"] = fuse_padded_convolutions(gm)
        seen["targets"] = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        return gm
    x = torch.randn(2, 4, 10, dtype=torch.float64, requires_grad=True)
    out = torch.compile(model, backend=capture, fullgraph=True)(x)
    assert seen["count"] == 2
    assert seen["targets"].count(torch.ops.seqpar.padded_conv1d.default) == 2
    assert torch.conv1d not in seen["targets"] and F.pad not in seen["targets"]
    torch.testing.assert_close(out, model(x), rtol=0, atol=1e-14)


def test_padded_conv1d_gradient():
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: padded_conv1d_op(x, w, b, 4, 0, 2, 3), (x, w, b))


def test_the_sharded_ops_on_one_rank_are_the_plain_ops():
    """With no group (one rank) the fetch, the halo convolution and the scan compute what torch
    does on the whole sequence, gradients included."""
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, dtype=torch.float64)
    cases = [
        (lambda t: torch.ops.seqpar.sequence_fetch.default(t, 2, "shift:3:1", "ring", ""), lambda t: torch.roll(t, 3, 2)),
        (lambda t: torch.ops.seqpar.sequence_fetch.default(t, 2, "flip", "zigzag", ""), lambda t: torch.flip(t, [2])),
        (lambda t: torch.ops.seqpar.halo_conv1d.default(t, w, None, 4, 0, 2, 3, "ring", ""),
         lambda t: F.conv1d(F.pad(t, (4, 0)), w, dilation=2, groups=3)),
        (lambda t: torch.ops.seqpar.sequence_scan.default(t, 2, "logcumsumexp", "ring", ""),
         lambda t: torch.logcumsumexp(t, 2)),
    ]
    g = torch.randn(2, 3, 8, dtype=torch.float64)
    for ours, theirs in cases:
        a, = torch.autograd.grad((ours(x) * g).sum(), x)
        b, = torch.autograd.grad((theirs(x) * g).sum(), x)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-13)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
