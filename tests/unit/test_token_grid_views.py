"""Views that split the sequence into rows of a token grid, decided by the sharding core.

Under a contiguous layout (ring, distflash, ulysses) a rank's shard of ``[B, H·W, C]`` is a band
of whole rows when P divides H: the view to ``[B, H, W, C]`` stays sharded on the row dim
(``post = 1/W``). Zigzag and striped shards are no band: the view is refused, with the reason
and the layout that would keep it. ``auto`` prefers a contiguous layout for non-causal models."""
from fractions import Fraction

import pytest
import torch

from seqpar_compiler.cost_model import AttentionSpec, choose_schedule
from seqpar_compiler.profile import shipped_profiles
from seqpar_compiler.runtime.sharding.layout import layout_of
from seqpar_compiler.runtime.sharding.ops import Refusal, TensorArg, plan_op
from seqpar_compiler.runtime.sharding.placements import Shard, seq_factors

aten = torch.ops.aten
B, H, W, C = 2, 8, 4, 6
S = H * W


def _view(dst, schedule, P=2, src=(B, S, C), placement=Shard(1)):
    x = TensorArg(src, torch.float32, placement)
    return plan_op(aten.view.default, (x, list(dst)), {}, S=S, P=P, group_name=None, out_shapes=(tuple(dst),),
                   schedule=schedule)


@pytest.mark.parametrize("schedule", ["ring", "distflash", "ulysses"])
def test_a_contiguous_layout_keeps_the_rows_of_a_token_grid_sharded(schedule):
    plan = _view((B, H, W, C), schedule)
    assert plan.outputs == (Shard(1, 1, Fraction(1, W)),)
    assert plan.args[1] == [B, H // 2, W, C]          # each rank its band of H/P rows


def test_rows_merged_with_features_or_back_into_the_sequence():
    assert _view((B, H, W * C), "ring").outputs == (Shard(1, 1, Fraction(1, W)),)
    band = Shard(1, 1, Fraction(1, W))
    assert _view((B, S, C), "ring", src=(B, H, W, C), placement=band).outputs == (Shard(1),)
    # unpatchify: rows of tokens merged with the p pixel rows of each patch
    pixels = _view((B, H * 2, W, 3), "ring", src=(B, H, 2, W, 3), placement=band)
    assert pixels.outputs == (Shard(1, 1, Fraction(2, W)),)


@pytest.mark.parametrize("schedule", ["zigzag", "striped", "hybrid:2"])
def test_zigzag_and_striped_refuse_a_token_grid_naming_the_layout_that_keeps_it(schedule):
    with pytest.raises(Refusal, match="no band of rows.*contiguous layout"):
        _view((B, H, W, C), schedule, P=4 if schedule.startswith("hybrid") else 2)


def test_rows_that_straddle_ranks_are_refused_naming_the_condition():
    """P = 16 ranks hold 2 positions each: half a row of W = 4."""
    with pytest.raises(Refusal, match="no whole rows.*P=16 must divide the number of rows"):
        _view((B, H, W, C), "ring", P=16)


def test_a_band_unmerges_into_whole_rows_for_gathers_and_slices():
    assert seq_factors(2, Fraction(1, W), S) == (2, H, 1)
    assert seq_factors(1, Fraction(2, W), S // 2) == (1, H, 1)
    assert layout_of("ring").keeps_band(S, 2, Fraction(1, W))
    assert not layout_of("zigzag").keeps_band(S, 2, Fraction(1, W))


def test_auto_prefers_a_contiguous_layout_without_causal_attention():
    h100 = shipped_profiles()["h100-dgx"]
    spec = AttentionSpec(B=1, Hq=16, Hkv=16, S=8 * 4096, D=64, causal=False, dtype_bytes=2)
    schedule, _, totals = choose_schedule([spec], 8, h100)
    assert layout_of(schedule).contiguous, totals


def test_an_unknown_layout_name_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match="allowed: ring, zigzag, striped, distflash, ulysses, hybrid:u"):
        layout_of("zig-zag")
    with pytest.raises(ValueError, match="allowed"):
        layout_of("hybrid")
