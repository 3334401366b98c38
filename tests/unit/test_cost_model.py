"""The cost model (DESIGN §8): its accounting follows the ring plans, its choices follow its
predictions, and profiles load, validate and cache as documented. No process group needed."""
import json

import pytest

import seqpar_compiler as sp
from seqpar_compiler.cost_model import AttentionSpec, _shared_finish, allowed_schedules, choose_schedule, predict
from seqpar_compiler.profile import Profile, cache_path, load_profile, shipped_profiles

H100 = shipped_profiles()["h100-dgx"]
LLAMA = dict(B=1, Hq=32, Hkv=32, D=128, dtype_bytes=2)


def _compute_only(**kw) -> Profile:
    return Profile(name="compute-only", flops_per_second=1e12, backward_ratio=2.5, bandwidth=float("inf"), **kw)


@pytest.mark.parametrize("P", [2, 4, 8])
def test_ring_causal_imbalance_is_2p_minus_1_over_p(P):
    pred = predict(AttentionSpec(B=1, Hq=4, Hkv=4, S=4096 * P, D=64), "ring", P, H100)
    assert pred.imbalance == pytest.approx((2 * P - 1) / P, rel=0.01)


@pytest.mark.parametrize("schedule", ["zigzag", "striped"])
def test_zigzag_and_striped_balance_causal_work_within_1pct(schedule):
    pred = predict(AttentionSpec(B=1, Hq=4, Hkv=4, S=8 * 2048, D=64), schedule, 8, H100)
    assert pred.imbalance <= 1.01


def test_distflash_imbalance_is_1_plus_1_over_p_for_even_p():
    pred = predict(AttentionSpec(B=1, Hq=4, Hkv=4, S=4 * 4096, D=64), "distflash", 4, H100)
    assert pred.imbalance == pytest.approx(1.25, rel=0.01)


def test_total_flops_are_the_same_under_every_schedule():
    """Schedules move work between ranks; the visible (query, key) pairs are the same."""
    spec = AttentionSpec(B=1, Hq=2, Hkv=2, S=512, D=16)
    totals = {s: sum(predict(spec, s, 4, H100).rank_flops()) for s in ("ring", "zigzag", "striped", "distflash")}
    assert len(set(totals.values())) == 1, totals


def test_compute_bound_ring_is_predicted_2p_minus_1_over_p_slower_than_zigzag():
    spec = AttentionSpec(S=4 * 8192, **LLAMA)
    ring, zigzag = (predict(spec, s, 4, _compute_only()).seconds for s in ("ring", "zigzag"))
    assert ring / zigzag == pytest.approx(7 / 4, rel=0.02)


def test_transfer_bound_time_is_steps_times_kv_bytes_over_bandwidth():
    """With free compute and no latency, a non-causal ring of P steps (P-1 hops) forward and
    P steps backward (KV plus fp32 dK/dV accumulators) costs exactly its bytes over the link."""
    P, S, B, H, D = 4, 4096, 1, 8, 64
    prof = Profile(name="wire", flops_per_second=1e30, backward_ratio=1.0, bandwidth=1e9)
    pred = predict(AttentionSpec(B=B, Hq=H, Hkv=H, S=S, D=D, causal=False), "ring", P, prof)
    kv = 2 * B * H * (S // P) * D
    assert pred.forward_seconds == pytest.approx((P - 1) * kv * 4 / 1e9)
    assert pred.backward_seconds == pytest.approx(((P - 1) * kv * 4 + P * kv * 4) / 1e9)


def test_overlap_is_never_predicted_slower_than_no_overlap():
    spec = AttentionSpec(S=16 * 2048, **LLAMA)
    for s in allowed_schedules(spec.S, 16):
        assert predict(spec, s, 16, H100, overlap=True).seconds <= predict(spec, s, 16, H100, overlap=False).seconds


def test_ranks_sharing_cores_run_at_cores_over_busy_ranks():
    assert _shared_finish([1.0] * 4, cores=2, threads=1) == pytest.approx([2.0] * 4)
    assert _shared_finish([1.0, 3.0], cores=2, threads=1) == pytest.approx([1.0, 3.0])
    # 2 busy ranks on 1 core: both at half speed until the short one ends, then full speed
    assert _shared_finish([1.0, 3.0], cores=1, threads=1) == pytest.approx([2.0, 4.0])
    # every core busy: each runs 1/slowdown as fast (measured contention); one alone: full speed
    assert _shared_finish([1.0, 1.0], cores=2, threads=1, slowdown=1.5) == pytest.approx([1.5, 1.5])
    assert _shared_finish([0.0, 1.0], cores=2, threads=1, slowdown=1.5) == pytest.approx([0.0, 1.0])


def test_auto_picks_a_balanced_schedule_for_long_causal_attention():
    schedule, overlap, totals = choose_schedule([AttentionSpec(S=8 * 65536, **LLAMA)], 8, H100)
    assert schedule in ("zigzag", "striped") and overlap
    assert totals[schedule, True] < totals["ring", True] / 1.5


def test_auto_picks_the_contiguous_ring_for_a_short_sliding_window():
    """A window shorter than a rank's share needs only the neighbour's block under ``ring``."""
    spec = AttentionSpec(S=8 * 8192, window=1024, **LLAMA)
    schedule, _, totals = choose_schedule([spec], 8, H100)
    assert schedule in ("ring", "distflash"), totals


def test_auto_only_considers_schedules_the_length_allows():
    assert allowed_schedules(12, 4) == ["striped", "ring", "distflash"]      # zigzag needs a multiple of 8
    with pytest.raises(ValueError, match="multiple of 4"):
        choose_schedule([AttentionSpec(B=1, Hq=1, Hkv=1, S=10, D=8)], 4, H100)


def test_shipped_profiles_cite_their_sources():
    from seqpar_compiler import profile as module
    text = (module._SHIPPED_FILE).read_text()
    assert {"a100-dgx", "h100-dgx"} <= set(shipped_profiles())
    for needle in ("datasheet", "FlashAttention-2", "InfiniBand", "NVLink"):
        assert needle in text


def test_ring_over_more_gpus_than_a_node_uses_the_infiniband_figure():
    assert H100.ring_bandwidth(8) == H100.bandwidth
    assert H100.ring_bandwidth(16) == H100.inter_node_bandwidth < H100.bandwidth


def test_unknown_profile_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"allowed: a100-dgx, h100-dgx, or the path of a profile \.json"):
        load_profile("tpu-v9")


def test_profile_file_round_trips_and_unknown_fields_are_errors(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(H100.as_dict()))
    assert load_profile(str(path)) == H100
    path.write_text(json.dumps({**H100.as_dict(), "teraflops": 1}))
    with pytest.raises(ValueError, match="unknown profile field"):
        load_profile(str(path))


def test_calibrated_profile_is_cached_under_the_user_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_path().parent == tmp_path / "seqpar"
    assert load_profile(None) is None                    # nothing cached: the caller calibrates
    from seqpar_compiler.profile import _save
    _save(H100, cache_path())
    assert load_profile(None) == H100
    cache_path().write_text('{"flops": 1}')            # another version's cache: calibrate again
    assert load_profile(None) is None


def test_auto_is_the_default_schedule():
    from seqpar_compiler.options import OPTIONS
    assert OPTIONS["schedule"].default == "auto" and "auto" in OPTIONS["schedule"].choices


def test_local_outputs_with_auto_schedule_are_an_error_naming_the_fixed_ones():
    with pytest.raises(ValueError, match="OUTPUT=local needs a fixed schedule.*ring, zigzag, striped, distflash"):
        sp.backend(output="local", schedule="auto")


def test_runtime_functions_refuse_auto_because_shards_have_a_fixed_layout(monkeypatch):
    import torch
    monkeypatch.setenv("SEQPAR_SCHEDULE", "auto")
    with pytest.raises(ValueError, match="chosen by the compiler per graph"):
        sp.shard_sequence(torch.zeros(2, 8), 1, schedule=None)
