"""shard_sequence / gather_sequence: layouts, round trip and the gradient convention."""
import pytest
import torch

import ring_workers as W
from seqpar_compiler.launch import run_ranks

SCHEDULES = ["ring", "zigzag", "striped", "distflash"]


def _all_schedules(rank, P):
    return {s: W.shard_gather_case(rank, P, s) for s in SCHEDULES}


@pytest.fixture(scope="module")
def p3():
    return run_ranks(_all_schedules, 3, timeout=120)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shard_takes_the_layout_positions_and_gather_restores_natural_order(p3, schedule):
    for res in p3:
        assert res[schedule]["local_ok"] and res[schedule]["roundtrip_ok"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shard_gradient_is_the_same_full_gradient_on_every_rank(p3, schedule):
    from seqpar_compiler.runtime import local_positions
    grads = [torch.tensor(r[schedule]["x_grad"]) for r in p3]
    assert all(torch.equal(g, grads[0]) for g in grads)
    S = grads[0].shape[1]
    expected = torch.zeros_like(grads[0])
    for rank, r in enumerate(p3):
        expected[:, local_positions(schedule, rank, 3, S)] = torch.tensor(r[schedule]["w"])
    assert torch.equal(grads[0], expected)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gather_gradient_is_this_ranks_slice(p3, schedule):
    assert all(r[schedule]["y_grad_ok"] for r in p3)
