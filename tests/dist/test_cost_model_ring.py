"""The cost model against the ring it models, on real gloo ranks: the per-rank FLOPs and bytes it
predicts are the ring's own ``stats()`` counters, and calibration is collective and agreed."""
import pytest

import cost_model_workers as W
from seqpar_compiler.cost_model import AttentionSpec, predict
from seqpar_compiler.launch import run_ranks
from seqpar_compiler.profile import shipped_profiles

P = 3          # odd: distflash balances exactly, zigzag/striped/ring all differ


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(W.run, P, str(tmp_path_factory.mktemp("cache")), timeout=600, pg_timeout=300)


@pytest.mark.parametrize("schedule", W.SCHEDULES)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_model_flops_and_bytes_equal_the_ring_counters(results, schedule, direction):
    pred = predict(AttentionSpec(B=1, Hq=2, Hkv=2, S=64 * P, D=16), schedule, P, shipped_profiles()["h100-dgx"])
    steps = pred.forward if direction == "forward" else pred.backward
    for rank, res in enumerate(results):
        flops, sent = res["counters"][schedule][direction]
        assert sum(s.flops[rank] for s in steps) == flops, (rank, "flops")
        assert sum(s.bytes_sent[rank] for s in steps) == sent, (rank, "bytes")


def test_calibration_gives_every_rank_the_same_profile_and_caches_it(results):
    profiles = [res["calibrate"]["profile"] for res in results]
    assert all(p == profiles[0] for p in profiles)
    assert results[0]["calibrate"]["cached"]
    prof = profiles[0]
    assert prof["flops_per_second"] > 1e8 and prof["bandwidth"] > 1e6 and prof["shared_cores"] >= 1


def test_calibration_is_not_counted_as_the_users_attention(results):
    """The first ``schedule="auto"`` compile on a new machine calibrates inside whatever
    ``stats()`` block the user has open; the attention it times is seqpar's, not the user's."""
    for res in results:
        assert res["calibrate"]["counted"] == (0, 0), res["calibrate"]["counted"]
