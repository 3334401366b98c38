"""Parts of the sequence between frames (``ShardSpec.part``): a SequenceShard split along its
sequence dim stays split, each rank its own tokens of every chunk, through an output projection
and a cross entropy (eager or in a compiled frame), and back (``cat``, the split's and the
slice's backward). 2 and 4 gloo ranks, float64, zigzag / ring / striped layouts.
"""
import pytest

import sequence_parts_workers as W
from seqpar_compiler.launch import run_ranks


@pytest.fixture(scope="module", params=[2, 4], ids=["P2", "P4"])
def results(request):
    env = {"SEQPAR_INNER": "aot_eager"}
    return request.param, run_ranks(W.part_cases, request.param, timeout=600, pg_timeout=300, env=env)


def _cases(results):
    _, by_rank = results
    return [(key, r) for rank_out in by_rank for key, r in rank_out.items() if len(key) == 3 and key[0] != "reduce"]


def test_chunked_loss_on_parts_is_exact(results):
    for key, r in _cases(results):        # float32 cross entropy: float32 rounding
        assert r["loss"] <= 1e-6, (key, r)
        assert r["grad_h"] <= 1e-6, (key, r)
        assert r["grad_W"] <= 1e-6, (key, r)


def test_chunks_stay_parts_and_nothing_is_gathered(results):
    P, _ = results
    for key, r in _cases(results):
        assert r["parts"], key
        # every token of every chunk is held by exactly one rank
        assert r["held"] == r["lengths"], (key, r["held"], r["lengths"])
        assert r["gathers"] == 0, (key, r)


def test_nothing_is_warned(results):
    for key, r in _cases(results):
        assert not r["warnings"], (key, r["warnings"])


def test_cat_of_parts_is_the_whole_shard(results):
    _, by_rank = results
    for rank_out in by_rank:
        for key, r in rank_out.items():
            if len(key) == 2:
                assert r["whole"], key
                assert r["error"] <= 1e-15, (key, r)


def test_a_part_leaves_a_frame_as_a_part_and_its_loss_shards_in_the_next():
    """The chunk ``(h + a)[:, 3:29]`` returned at a graph break crosses it as a part (not
    gathered at the exit); the head and the loss in the next frame run on each rank's rows."""
    env = {"SEQPAR_INNER": "aot_eager", "SEQPAR_SCHEDULE": "zigzag"}
    for r in run_ranks(W.part_across_a_graph_break, 2, timeout=300, pg_timeout=120, env=env):
        assert r["loss"] <= 1e-6, r                 # float32 cross entropy
        assert max(r["grads"].values()) <= 1e-6, r["grads"]
        assert r["ring_calls"] == 1, r
        assert r["gathers"] == 0, r
        assert not r["warnings"], r["warnings"]


def _row_cases(results):
    _, by_rank = results
    return [(key, r) for rank_out in by_rank for key, r in rank_out.items() if len(key) == 4]


def test_a_batch_merged_sequence_cut_across_rows_stays_sharded(results):
    """``logits.reshape(-1, V).split(n)`` (chunks across batch rows), litgpt's per-chunk losses
    joined in chunk order, pieces joined in reverse: each rank computes its own rows (the
    ``Blocks`` layout), nothing is gathered or warned, and every value, loss and gradient equals
    the one-process float64 result; a chunk given to a compiled loss enters its frame as a part. Batch 1 and 3; zigzag, ring, striped, and hybrid:2 on 4 ranks
    (whose local rows do not run in position order)."""
    cases = _row_cases(results)
    assert len(cases) >= 2 * 3 * 2 * (len(W.ROW_CASES) - len(W.COMPILED_ROW_CASES))
    assert any(key[2] in W.COMPILED_ROW_CASES for key, _ in cases)
    for key, r in cases:
        assert max(r["loss"], r["grad_h"], r["grad_W"], r["values"]) <= 1e-12, (key, r)
        assert r["shards"], key
        assert r["gathers"] == 0, (key, r)
        assert not r["warnings"], (key, r["warnings"])


def test_reductions_of_a_part_are_exact_in_value_and_gradient(results):
    """A mean over a part is each rank's sum over the global count (ranks hold different counts
    of its rows; averaging local means was 34% off, silently), and var/std's backward, which
    subtracts that mean, is exact too: a cut of the sequence and a cut across merged rows."""
    _, by_rank = results
    cases = [(key, r) for rank_out in by_rank for key, r in rank_out.items() if key[0] == "reduce"]
    assert len(cases) == len(by_rank) * len(W.PART_CUTS) * len(W.PART_REDUCTIONS)
    for key, r in cases:
        assert r["value"] <= 1e-12 and r["grad"] <= 1e-12, (key, r)


def test_a_whole_sequence_joined_to_another_between_frames_feeds_a_longer_attention():
    env = {"SEQPAR_INNER": "aot_eager", "SEQPAR_SCHEDULE": "zigzag"}
    res = run_ranks(W.longer_sequence_across_a_break, 2, timeout=300, pg_timeout=120, env=env)
    r0 = res[0]
    for r in res:
        assert r["loss"] <= 1e-12 and r["grads"] <= 1e-12, r
        assert r["ring_calls"] == 2, r                   # both attentions sharded, at S and at 2S
        assert not [w for w in r["warnings"] if "replicated" in w], r["warnings"]
    said = [w for w in r0["warnings"] if "gathered at its entry" in w and "length 64" in w]
    assert said, r0["warnings"]                      # the entry gather is said once, by rank 0
