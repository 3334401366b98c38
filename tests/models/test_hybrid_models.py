"""Hybrid models (recurrent layers between attention layers) on 2 and 4 ranks: one training step
exact against single-process eager in float64 (loss and every gradient), attention as the ring,
the chunked linear recurrences run across ranks by passing their boundary state (no gather, no
warning about them), nothing of the sequence's full length saved for the backward.

Models: transformers' Bamba, NemotronH and GraniteMoeHybrid (Mamba-2 mixers, their torch path)
and a model written in flash-linear-attention's reference style (``fla_modules.py``). The
contiguous layout (``ring``): the state passes from rank to rank in sequence order. Sizes keep
the chunk count distinct from head counts, and S distinct from every weight's dims (the
saved-tensor probe counts any tensor with a dim of length S) (``passes/recurrences.py``
makes a zone local by its sizes and proves the result).
"""
import pytest

import hybrid_workers as W
from seqpar_compiler.launch import run_ranks

pytest.importorskip("transformers")

# float64 models; transformers' Mamba-2 path computes its scan in float32 whatever the model's
# dtype (``hidden_states.float()``), so those agree to float32 rounding of a different order
TOL = {"mamba2": 1e-5, "fla_gla": 1e-10, "bamba": 1e-5, "nemotron_h": 1e-5, "granite_hybrid": 1e-5, "qwen3_next": 1e-5}
# the default run's budget: the fla-style model and a pure state-space model (no attention at all:
# its chunked scans give the frame its length, and auto picks the contiguous layout they need)
DEFAULT = [("fla_gla", 96), ("mamba2", 96, {"schedule": "auto"})]
SLOW_2 = [("bamba", 96), ("nemotron_h", 96), ("granite_hybrid", 96), ("bamba", 224, {"layers": 4}),
          ("bamba", 288, {"schedule": "zigzag"}), ("qwen3_next", 96)]
SLOW_4 = [("bamba", 320), ("fla_gla", 320)]


def _recurrence_warnings(r) -> list:
    return [m for m in r["warnings"] if "chunked scan" in m or "splits the sequence" in m
            or "carried_recurrence" in m]


def _check(results, key, ring_calls):
    for rank, res in enumerate(results):
        r = res[key]
        assert r["error"] is None, (rank, r["error"], r.get("traceback"))
        tol = TOL[r["name"]]
        assert r["loss"] < tol and r["worst_grad"][1] < tol, (rank, r["loss"], r["worst_grad"])
        assert r["missing"] == [], r["missing"]
        assert r["ring_calls"] == ring_calls, r["ring_calls"]
        assert _recurrence_warnings(r) == [], _recurrence_warnings(r)
        # the causal conv1d before each Mamba-2 scan is a halo exchange: nothing gathered at all
        assert r["warnings"] == [] and r["gathers"] == 0 and r["full_saves"] == [], (rank, r["warnings"],
                                                                                    r["gathers"], r["full_saves"])


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(W.run_hybrids, 2, DEFAULT, timeout=600, pg_timeout=300)


def test_fla_style_gla_is_exact_with_state_passing_and_nothing_gathered(two_ranks):
    _check(two_ranks, "fla_gla@96", ring_calls=1)


def test_a_model_with_no_attention_is_sharded_by_its_recurrences(two_ranks):
    _check(two_ranks, "mamba2@96", ring_calls=0)


@pytest.fixture(scope="module")
def two_ranks_slow():
    return run_ranks(W.run_hybrids, 2, SLOW_2, timeout=1800, pg_timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("key,ring_calls", [("bamba@96", 1), ("nemotron_h@96", 1), ("granite_hybrid@96", 1),
                                            ("bamba@224", 2)])
def test_more_hybrids_are_exact_across_ranks(two_ranks_slow, key, ring_calls):
    _check(two_ranks_slow, key, ring_calls)


@pytest.mark.slow
def test_zigzag_layout_gathers_the_recurrence_with_a_warning(two_ranks_slow):
    """The state passes in sequence order: on zigzag shards the recurrence is gathered, said, exact."""
    r = two_ranks_slow[0]["bamba@288"]
    assert r["error"] is None and r["loss"] < TOL["bamba"] and r["worst_grad"][1] < TOL["bamba"], r
    assert any("carried_recurrence" in m and "not contiguous" in m for m in r["warnings"]), r["warnings"]


@pytest.mark.slow
def test_an_unrecognised_recurrence_is_gathered_warned_and_exact(two_ranks_slow):
    """Qwen3-Next's gated DeltaNet loops over chunks in Python (unrolled by Dynamo, the sequence
    padded to whole chunks): no chunk zone; the sequence is gathered there, said, and exact."""
    for rank, res in enumerate(two_ranks_slow):
        r = res["qwen3_next@96"]
        assert r["error"] is None and r["loss"] < TOL["qwen3_next"] and r["worst_grad"][1] < TOL["qwen3_next"], r
        assert r["ring_calls"] == 1 and r["gathers"] > 0, r
        assert rank > 0 or any("gathering" in m or "gathered" in m for m in r["warnings"]), r["warnings"]


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(W.run_hybrids, 4, SLOW_4, timeout=1800, pg_timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["bamba@320", "fla_gla@320"])
def test_four_ranks_chain_the_state_exactly(four_ranks, key):
    _check(four_ranks, key, ring_calls=1)
