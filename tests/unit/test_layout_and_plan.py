"""Layouts and ring plans: properties every rank relies on to pair its sends and receives."""
import itertools

import pytest
import torch

from seqpar_compiler.kernels import AttentionSpec
from seqpar_compiler.runtime import SCHEDULES, build_plan, local_positions


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("P", [1, 2, 3, 4, 8])
def test_layouts_partition_the_sequence(schedule, P):
    S = 4 * P
    allpos = torch.cat([local_positions(schedule, r, P, S) for r in range(P)])
    assert torch.equal(allpos.sort().values, torch.arange(S))


def test_layouts_are_the_design_cards():
    assert local_positions("zigzag", 1, 2, 8).tolist() == [2, 3, 4, 5]
    assert local_positions("zigzag", 0, 2, 8).tolist() == [0, 1, 6, 7]
    assert local_positions("striped", 1, 4, 8).tolist() == [1, 5]
    assert local_positions("ring", 1, 2, 8).tolist() == [4, 5, 6, 7]


def test_indivisible_length_error_names_the_multiple():
    with pytest.raises(ValueError, match="multiple of 8 .*two chunks"):
        local_positions("zigzag", 0, 4, 12)
    with pytest.raises(ValueError, match="multiple of 3"):
        local_positions("striped", 0, 3, 10)


CONFIGS = [(s, P, causal, window) for s in SCHEDULES for P in (1, 2, 3, 4, 5, 8)
           for causal, window in ((False, None), (True, None), (True, 3), (True, 40))]


@pytest.mark.parametrize("schedule,P,causal,window", CONFIGS)
def test_plan_pairs_every_send_with_a_receive(schedule, P, causal, window):
    plan = build_plan(schedule, P, 16, AttentionSpec.of(causal=causal, window=window))
    for t, steps in enumerate(plan.steps):
        for r, st in enumerate(steps):
            assert st.forward_kv == steps[(r + 1) % P].receive_kv or P == 1
            if st.q_to is not None:
                assert steps[st.q_to].q_from == r
            if st.compute_own:
                assert st.holds is not None


@pytest.mark.parametrize("schedule,P,causal,window", CONFIGS)
def test_plan_computes_every_needed_block_exactly_once(schedule, P, causal, window):
    from seqpar_compiler.runtime.plan import _needed
    plan = build_plan(schedule, P, 16, AttentionSpec.of(causal=causal, window=window))
    needed = _needed(schedule, P, 16, AttentionSpec.of(causal=causal, window=window))
    done = []
    for steps in plan.steps:
        for r, st in enumerate(steps):
            if st.compute_own:
                done.append((r, st.holds))
            if st.help_q is not None:
                done.append((st.help_q, r))
    assert sorted(done) == sorted((i, j) for i, j in itertools.product(range(P), repeat=2) if needed[i][j])


def test_distflash_uses_floor_P_half_plus_one_steps():
    for P in (2, 3, 4, 8):
        assert build_plan("distflash", P, 16, AttentionSpec.of(causal=True)).num_steps == P // 2 + 1


def test_short_window_needs_one_hop_only():
    plan = build_plan("ring", 4, 16, AttentionSpec.of(causal=True, window=3))
    assert plan.num_steps == 2
    assert [st.forward_kv for st in plan.steps[0]] == [True, True, True, False]
