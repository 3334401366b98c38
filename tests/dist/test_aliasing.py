"""In-place writes and aliases are sharded with their semantics intact (2 ranks, aot_eager).

A write into a value that seqpar shards is only right if it lands in the local storage that
every alias of the value reads. The rewrite shards written storages optimistically, evaluates
the local graph on fake tensors to check that every alias set stayed one storage and every
write reached it, and computes a set that fails replicated (warned, exact). These cases are the
ways real model code writes: copies into a fresh buffer's slices (DeepSeek-V3's MLA), ``add_``
into an activation (Llama 4's MoE), writes along the sequence, in-place scans, writes through a
view that splits the sequence, writes along the features, and writes into a user's input.
"""
import pytest

import aliasing_workers as W
from seqpar_compiler.launch import run_ranks

SHARDED_IN_PLACE = ["NewEmptyCopySlices", "AddInPlaceIntoActivation", "SliceWriteAlongFeatures", "WriteIntoInput",
                    "WriteThroughViewSplittingSequence"]
FORCED_REPLICATED = ["SetitemAlongSequence", "InPlaceScanAlongSequence", "WriteThroughViewStraddlingRanks"]
REAL = ["deepseek-v3-mla-grouped_mm", "llama4-moe"]
# rows of S/2 straddle the ranks only under zigzag (auto picks a contiguous layout here, non-causal)
OPTIONS = {"WriteThroughViewStraddlingRanks": {"schedule": "zigzag"}}
CASES = ([(n, "alias", {"name": n, **OPTIONS.get(n, {})}) for n in W.CASES]
         + [(n, "real", {"name": n}) for n in REAL])


@pytest.fixture(scope="module")
def res():
    return run_ranks(W.run_cases, 2, CASES, timeout=600, pg_timeout=300)


@pytest.mark.parametrize("name", list(W.CASES))
def test_writes_and_their_aliases_match_one_process(res, name):
    for rank, r in enumerate(res):
        rr = r[name]
        worst = max(rr["grads"].items(), key=lambda kv: kv[1])
        assert rr["loss"] <= 1e-5 and worst[1] <= 1e-4, (rank, rr["loss"], worst)
        assert rr["ring_calls"] == 1, (rank, rr["ring_calls"])


@pytest.mark.parametrize("name", SHARDED_IN_PLACE)
def test_writes_a_shard_can_take_stay_sharded(res, name):
    """Writes along the features, into a fresh buffer shaped like a shard, or ``add_`` on an
    activation are done on the local shard: no storage is computed replicated."""
    for r in res:
        assert not [w for w in r[name]["warnings"] if "computed replicated so the write" in w], r[name]["warnings"]


@pytest.mark.parametrize("name", FORCED_REPLICATED)
def test_writes_no_shard_can_take_replicate_their_alias_set_with_a_warning(res, name):
    """A write along the sequence (one position, a scan, a view that splits the sequence) cannot
    be done on a shard in place: its whole alias set is computed replicated, said once."""
    warned = [w for w in res[0][name]["warnings"] if "computed replicated so the write" in w]
    assert len(warned) == 1 and "aliasing_workers.py" in warned[0], res[0][name]["warnings"]
    assert not [w for w in res[1][name]["warnings"] if "computed replicated" in w]      # rank 0 says it


def test_a_write_into_a_user_input_reaches_the_callers_tensor(res):
    for r in res:
        assert r["WriteIntoInput"]["input_write"] <= 1e-6


@pytest.mark.parametrize("name", REAL)
def test_real_models_that_write_in_place_match_one_process(res, name):
    """transformers' DeepseekV3ForCausalLM (K built by copy_ into new_empty's halves) and
    Llama4ForCausalLM (experts added by out.add_): loss, logits and every gradient exact, and
    no parameter left without a gradient."""
    for rank, r in enumerate(res):
        rr = r[name]
        assert rr["status"] == "exact", (rank, rr.get("error"), rr.get("loss"), rr.get("logits"), rr.get("worst_grad"))
        assert rr["missing_grads"] == [], rr["missing_grads"]
