"""Random ops on a shard of the sequence (2 gloo ranks, zigzag, one spawn).

Every rank holds the same random state, so a random op run as is on each shard would draw the
same numbers for different tokens: dropout's P shard masks would be one mask repeated. Dropout
draws a mask per rank (``runtime/rank_dropout.py``): independent shards, each element kept with
probability 1 - p, the full value the same on every rank, the gradient through the same mask.
Other random ops on shards are computed whole (warned): one device's numbers. A random
op on a replicated value (a per-sample drop-path mask) stays replicated: the same on every rank.
"""
import pytest
import torch

import random_ops_workers as W
from seqpar_compiler.launch import run_ranks

NAMES = list(W.AFTER)


@pytest.fixture(scope="module")
def res():
    return run_ranks(W.run_cases, 2, NAMES, timeout=600, pg_timeout=300)


def test_dropout_masks_are_drawn_per_rank_and_stay_sharded(res):
    r0, r1 = res[0]["dropout"], res[1]["dropout"]
    assert r0["type"] == "SequenceShard" and not r0["warnings"], (r0["type"], r0["warnings"])
    assert torch.equal(r0["full"], r1["full"])                     # one value, seen alike by every rank
    keep = r0["full"] != 0
    # zigzag on 2 ranks: rank 0 holds quarters 0 and 3, rank 1 quarters 1 and 2 of the sequence
    q = W.S // 4
    assert not torch.equal(keep[:, :q], keep[:, q:2 * q]) and not torch.equal(keep[:, 3 * q:], keep[:, 2 * q:3 * q])
    assert 0.35 < keep.float().mean() < 0.65, keep.float().mean()
    assert torch.allclose(r0["full"][keep], torch.full_like(r0["full"][keep], 2.0))     # kept: 1 / (1 - p)


def test_dropout_gradient_goes_through_the_drawn_mask(res):
    for r in res:
        # out = (1 + 0·a) · keep / (1 - p): the qkv weight gets no gradient through the ones, and a
        # non-zero one would mean the backward saw another mask or the 0·a term was mishandled
        assert torch.count_nonzero(r["dropout"]["grad"]) == 0


def test_other_random_ops_on_shards_are_computed_whole_bitwise(res):
    for r in res:
        rr = r["rand_like"]
        # the attention under it differs from one device by rounding (1e-7); another draw would differ by O(1)
        assert torch.allclose(rr["full"], rr["ref"], atol=1e-5, rtol=0), float((rr["full"] - rr["ref"]).abs().max())
        rel = float((rr["grad"] - rr["ref_grad"]).norm() / rr["ref_grad"].norm())
        assert rel <= 1e-5, rel
    said = res[0]["rand_like"]["warnings"]
    assert any("random" in w and "cannot shard" in w for w in said), said


def test_a_random_value_of_replicated_shape_agrees_across_ranks(res):
    a, b = res[0]["drop_path"], res[1]["drop_path"]
    assert torch.equal(a["full"], b["full"])
    assert torch.equal(a["full"] == 0, a["ref"] == 0)              # the same per-sample mask as one device
    assert torch.allclose(a["full"], a["ref"], atol=1e-5, rtol=0)


def test_random_ops_between_frames_are_computed_whole_and_warned(res):
    """Eager dropout / rand_like on a frame's SequenceShard output: one device's numbers."""
    for r in res:
        e = r["eager"]
        assert torch.equal(e["mask"], e["ref_mask"]) and torch.equal(e["noise"], e["ref_noise"])
    said = res[0]["eager"]["warnings"]
    assert any("bernoulli" in w or "native_dropout" in w for w in said) and any("rand_like" in w for w in said), said
