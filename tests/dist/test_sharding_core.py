"""The compiled path and the eager path shard an op the same way (2 ranks, float64).

Both take each ATen op's plan from the one sharding core (runtime/sharding/ops.py): the
compiled rewrite emits it as graph nodes, SequenceShard's eager dispatch runs it on local
tensors. Walking ops of every kind the core decides (its own rules: views of merged dims,
advanced indexing, reductions over the sequence, buffers shaped like a shard; DTensor's
strategies: pointwise, matmuls, softmax, norms, embedding, transposes, slices, cat; the ops that
mix the sequence through the group: scans, roll, flip, convolutions over time and their backward;
and a position-aware op it refuses along the sequence), each op must land on the same placement
in both paths and equal the op on the full tensors. The same for ops on a part of the sequence
(a chunk: ``SeqRange`` compiled, ``ShardSpec.part`` eager), planned with the part's local length."""
import pytest

import sharding_core_workers as W
from seqpar_compiler.launch import run_ranks

NAMES = list(W.cases()) + list(W.grid_cases()) + list(W.part_cases())


@pytest.fixture(scope="module")
def res():
    return run_ranks(W.run_registry, 2, timeout=300)


@pytest.mark.parametrize("name", NAMES)
def test_compiled_and_eager_place_the_op_alike_and_exactly(res, name):
    for rank, r in enumerate(res):
        rr = r[name]
        assert "error" not in rr, (rank, rr)
        assert rr["compiled"] == rr["eager"], (rank, rr)
        assert rr["compiled_err"] <= 1e-12 and rr["eager_err"] <= 1e-12, (rank, rr)


def test_the_walk_covers_sharded_replicated_and_partial_results(res):
    placements = {r["compiled"] for r in res[0].values() if "compiled" in r}
    assert any(p.startswith("Shard(") for p in placements) and "Replicate()" in placements


def test_token_grid_rows_stay_sharded_under_a_contiguous_layout_only(res):
    """A view that splits the sequence into rows keeps a band of rows sharded under the ring's
    contiguous layout (the row dim carries post = 1/W) and gathers under zigzag."""
    r = res[0]
    assert r["grid-view-splits-sequence-into-rows"]["compiled"] == "Shard(1, pre=1, post=1/4)", r
    assert r["grid-view-rows-back-to-sequence"]["compiled"] == "Shard(1)", r
    assert r["grid-permute-channels-first"]["compiled"] == "Shard(2, pre=1, post=1/4)", r
    assert r["view-token-grid-zigzag"]["compiled"] == "Replicate()", r


def test_ops_on_a_part_stay_on_the_part_and_a_scan_along_it_is_gathered(res):
    for r in res:
        assert r["part-log-softmax"]["compiled"] == "SeqRange(1, [3, 13))", r["part-log-softmax"]
        assert r["part-view-merges-batch"]["compiled"] == "SeqRange(0, pre=2, post=1, [3, 13))", r
        assert r["part-sum-over-sequence"]["compiled"] == "Replicate()", r
        assert r["part-cumsum-refused"]["compiled"] == "Replicate()", r


def test_every_rule_of_the_core_is_walked():
    """A rule added to the core without a case here is a rule nobody checked in both paths."""
    from seqpar_compiler.runtime.sharding.ops import RULES
    walked = {op for op, _, _ in W.cases().values()}
    assert set(RULES) <= walked, sorted(map(str, set(RULES) - walked))
