"""The cost model's all-to-all terms and auto's choice among ring, Ulysses and hybrid (issue 15)."""
import pytest

from seqpar_compiler.cost_model import AttentionSpec, choose_schedule, predict
from seqpar_compiler.cost_model_a2a import a2a_bytes_per_rank, a2a_candidates
from seqpar_compiler.profile import load_profile

H100 = load_profile("h100-dgx")
LLAMA = dict(B=1, Hq=32, Hkv=32, D=128, dtype_bytes=2)


def test_ulysses_traffic_per_rank_shrinks_with_P_while_the_rings_stays():
    S = 8192 * 64
    a2a = {P: sum(a2a_bytes_per_rank(AttentionSpec(S=S, **LLAMA), "ulysses", P)) for P in (4, 8, 16)}
    assert a2a[16] < a2a[8] < a2a[4]
    ring = {P: sum(s.bytes_sent[0] for s in predict(AttentionSpec(S=S, **LLAMA), "zigzag", P, H100).forward)
            for P in (4, 8)}
    assert ring[8] >= ring[4]


def test_candidates_need_heads_divisible_by_the_degree():
    assert a2a_candidates(64, 4, 4) == ["ulysses", "hybrid:2"]
    assert a2a_candidates(64, 4, 6) == ["hybrid:2"]
    assert a2a_candidates(64, 4, 3) == []


def test_auto_never_picks_ulysses_when_heads_do_not_divide():
    schedule, _, totals = choose_schedule([AttentionSpec(S=4 * 8192, B=1, Hq=6, Hkv=6, D=64)], 4, H100)
    assert not any(s == "ulysses" for s, _ in totals) and schedule != "ulysses"


def test_all_to_all_leaving_a_node_is_predicted_slower_than_inside_it():
    spec = AttentionSpec(S=16 * 8192, **LLAMA)
    inside = predict(spec, "hybrid:8", 16, H100).notes["a2a_seconds"]
    across = predict(spec, "ulysses", 16, H100).notes["a2a_seconds"]
    assert across > inside


def test_hybrid_prediction_splits_all_to_all_and_ring_traffic():
    p = predict(AttentionSpec(S=16 * 8192, **LLAMA), "hybrid:8", 16, H100)
    assert p.notes["degree"] == 8 and p.notes["groups"] == 2
    assert p.notes["a2a_bytes_per_rank"] > 0 and p.notes["ring_bytes_per_rank"] > 0
    assert p.seconds == pytest.approx(p.notes["a2a_seconds"] + p.notes["attention_seconds"])


def test_backward_bytes_are_dout_in_and_gradients_out():
    """The runtime saves the forward's head-sharded tensors: the backward moves (u−1)/u of dout,
    dq, dk, dv per rank (K/V at the heads on the wire: 2 KV heads replicated to 4 at u = 4)."""
    spec = AttentionSpec(S=4 * 1024, B=1, Hq=8, Hkv=2, D=64, dtype_bytes=2)
    q = 1 * 8 * 1024 * 64 * 2
    kv = 2 * 1 * 4 * 1024 * 64 * 2
    fwd, bwd = a2a_bytes_per_rank(spec, "ulysses", 4)
    assert bwd == (2 * q + kv) * 3 // 4
    assert fwd == (2 * q + kv + 8 * 1024 * 4) * 3 // 4
