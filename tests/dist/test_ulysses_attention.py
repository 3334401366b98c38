"""All-to-all (Ulysses) attention and the Ulysses × ring hybrid on gloo ranks against a float64
single-process reference (issue 15). One spawn per group shape runs every case:
``ulysses`` at P = 2 and 4, ``hybrid`` 2×2 (u = 2 inside groups, zigzag ring over 2 groups).
"""
import math

import pytest
import torch

import ulysses_workers as W
from seqpar_compiler.launch import run_ranks

MASKS = {
    "full": dict(causal=False),
    "causal": dict(causal=True),
    "window": dict(causal=True, window=5),
    "docs-causal": dict(causal=True, docs=True),
    "docs": dict(causal=False, docs=True),
    "alibi-causal": dict(causal=True, alibi=True),
    "alibi-full": dict(causal=False, alibi=True),
    "softcap-causal": dict(causal=True, softcap=2.0),
    "dv48-causal": dict(causal=True, Dv=48),
    "alibi-softcap-window": dict(causal=True, window=5, alibi=True, softcap=2.0),
    "alibi-dv24-docs-causal": dict(causal=True, docs=True, alibi=True, Dv=24),
    "padding-causal": dict(causal=True, padding=True),
    "padding-docs-window": dict(causal=True, padding=True, docs=True, window=7),
    "learned-table-padding": dict(causal=False, padding=True, learned_table=True),
}
# (Hq, Hkv): Hkv >= P, GQA with Hkv < P (KV heads replicated), MQA, and 6 KV heads on 4 ranks
HEADS = {"4x4": (4, 4), "8x2": (8, 2), "4x1": (4, 1), "12x6": (12, 6)}

GROUPS = {"P2": (2, "ulysses", None), "P4": (4, "ulysses", None), "2x2": (4, "hybrid", 2)}


def _cases(P, schedule, u):
    base = dict(schedule=schedule, u=u)
    cases = [(f"{m}", "accuracy", dict(base, **kw)) for m, kw in MASKS.items()]
    cases += [(f"causal-{h}", "accuracy", dict(base, causal=True, Hq=hq, Hkv=hkv)) for h, (hq, hkv) in HEADS.items()]
    cases += [("docs-window-8x2", "accuracy", dict(base, causal=True, window=7, docs=True, Hq=8, Hkv=2)),
              ("causal-math", "accuracy", dict(base, causal=True, kernel="math", Hq=8, Hkv=2)),
              ("causal-bf16", "accuracy", dict(base, causal=True, dtype="bfloat16", S_local=32, D=64)),
              ("stats-causal", "stats", dict(base, causal=True)),
              ("stats-docs-mqa", "stats", dict(base, causal=True, docs=True, Hq=4, Hkv=1)),
              ("staging-docs-gqa", "staging", dict(base)),
              ("err-heads", "error", dict(base, Hq=6, Hkv=6)),
              ("err-degree", "error", dict(schedule="hybrid", u=3)),
              ("err-too-big", "error", dict(schedule="hybrid", u=8))]
    return cases


CASES = {g: _cases(*spec) for g, spec in GROUPS.items()}


@pytest.fixture(scope="module")
def results():
    cache = {}

    def get(g):
        if g not in cache:
            cache[g] = run_ranks(W.run_cases, GROUPS[g][0], CASES[g], timeout=400)
        return cache[g]
    return get


def _rel(res, name):
    out = {}
    for key in ("out", "dq", "dk", "dv", "dtable"):
        if key not in res[0][name]:
            continue
        assert not any(r[name][key][2] for r in res), f"{name}: NaN in {key}"
        out[key] = math.sqrt(sum(r[name][key][0] for r in res) / sum(r[name][key][1] for r in res))
    return out


ACC = [(g, n) for g, cases in CASES.items() for n, kind, kw in cases
       if kind == "accuracy" and kw.get("dtype", "float32") == "float32"]


@pytest.mark.parametrize("g,name", ACC, ids=[f"{g}-{n}" for g, n in ACC])
def test_fp32_all_to_all_attention_matches_float64_within_1e5(results, g, name):
    errs = _rel(results(g), name)
    print(f"{g} {name}: " + ", ".join(f"||{k}-ref||/||ref||={v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) <= 1e-5, errs


@pytest.mark.parametrize("g", list(GROUPS))
def test_gather_sequence_inverts_the_layout(results, g):
    for r in results(g):
        assert r["causal"]["gather_roundtrip"]


@pytest.mark.parametrize("g", list(GROUPS))
def test_bf16_error_at_most_twice_single_process_sdpa(results, g):
    res = results(g)
    errs = _rel(res, "causal-bf16")
    sdpa = {k: math.sqrt(v[0] / v[1]) for k, v in res[0]["causal-bf16"]["sdpa"].items()}
    print(f"{g}: all-to-all {errs} / sdpa {sdpa}")
    for key in errs:
        assert errs[key] <= 2 * sdpa[key], (key, errs[key], sdpa[key])


def test_bf16_error_does_not_grow_with_P(results):
    errs = {g: max(_rel(results(g), "causal-bf16").values()) for g in GROUPS}
    print("bf16 max rel err:", errs)
    assert errs["P4"] <= 1.5 * errs["P2"] and errs["2x2"] <= 1.5 * errs["P2"], errs


@pytest.mark.parametrize("g", ["P2", "P4"])
@pytest.mark.parametrize("name", ["stats-causal", "stats-docs-mqa"])
def test_ulysses_work_is_equal_on_every_rank_whatever_the_mask(results, g, name):
    """Every rank attends over the whole sequence for H/P heads: the same pairs, the same work."""
    flops = [r[name]["forward"]["attention_flops"] for r in results(g)]
    assert len(set(flops)) == 1 and flops[0] > 0, flops


@pytest.mark.parametrize("g", ["P2", "P4"])
def test_ulysses_forward_sends_p_minus_1_over_p_of_qkv_and_out_by_all_to_all(results, g):
    """Forward: q, k, v out and the result back, (P−1)/P of each; no ring traffic."""
    P = GROUPS[g][0]
    for r in results(g):
        s, fwd = r["stats-causal"], r["stats-causal"]["forward"]
        lse = s["q_bytes"] // 16                  # [B, H, S_l] fp32 beside q [B, H, S_l, D=16]
        expect = (2 * s["q_bytes"] + s["kv_bytes"] + lse) * (P - 1) // P
        assert fwd["a2a_bytes_sent"] == fwd["a2a_bytes_received"] == expect, (fwd, expect)
        assert fwd["bytes_sent"] == 0 and fwd["bytes_received"] == 0


def test_mqa_replicates_the_kv_head_to_the_degree(results):
    """Hkv = 1 < P = 4: K/V travel at 4 heads (one per rank), so each sends as much K/V as q."""
    for r in results("P4"):
        s = r["stats-docs-mqa"]
        fwd = s["forward"]
        # q + k + v at 4 heads each, out at 4 heads, lse, and the document ids all-gathered (int64)
        per_head_tensor = s["q_bytes"] * 3 // 4
        doc = 64 * 8 * 3
        assert fwd["a2a_bytes_sent"] == 4 * per_head_tensor + s["q_bytes"] // 16 * 3 // 4 + doc, fwd


@pytest.mark.parametrize("g", ["P2", "P4"])
def test_backward_sends_only_dout_in_and_the_gradients_out(results, g):
    """The forward's head-sharded q, k, v, out, lse are saved, so the backward's all-to-all moves
    (P−1)/P of dout, dq, dk and dv only (before: q, k, v, out, lse, dout in, dq, dk, dv out)."""
    P = GROUPS[g][0]
    for r in results(g):
        s, bwd = r["stats-causal"], r["stats-causal"]["backward"]
        expect = (2 * s["q_bytes"] + s["kv_bytes"]) * (P - 1) // P
        assert bwd["a2a_bytes_sent"] == bwd["a2a_bytes_received"] == expect, (bwd, expect)
        assert bwd["bytes_sent"] == 0


def test_backward_with_replicated_kv_heads_sends_them_at_the_wire_head_count(results):
    """MQA on 4 ranks: dk, dv come back at 4 heads (one per rank) and are summed to 1; the
    document ids are all-gathered again (int64, 1/(H·D) of a head tensor), nothing else."""
    for r in results("P4"):
        s, bwd = r["stats-docs-mqa"], r["stats-docs-mqa"]["backward"]
        doc = 64 * 8 * 3
        assert bwd["a2a_bytes_sent"] == 4 * s["q_bytes"] * 3 // 4 + doc, bwd


@pytest.mark.parametrize("g", list(GROUPS))
def test_host_staged_all_to_all_is_bitwise_the_direct_one(results, g):
    """Forced host staging (the path gloo takes for CUDA tensors) carries every all-to-all and,
    in the hybrid, every ring transfer, and changes no bit of the output or the gradients."""
    for r in results(g):
        staged, direct = r["staging-docs-gqa"]["staged"], r["staging-docs-gqa"]["direct"]
        assert direct["host_staged_bytes"] == 0
        assert staged["a2a_bytes"] > 0
        assert staged["host_staged_bytes"] == staged["a2a_bytes"] + staged["ring_bytes"], staged
        for a, b in zip(staged["tensors"], direct["tensors"]):
            assert torch.equal(a, b)


def test_hybrid_splits_traffic_between_all_to_all_and_ring(results):
    for r in results("2x2"):
        fwd = r["stats-causal"]["forward"]
        assert fwd["a2a_bytes_sent"] > 0 and fwd["bytes_sent"] > 0, fwd


def test_backward_runs_once_and_moves_gradients_by_all_to_all(results):
    for r in results("P4"):
        bwd = r["stats-causal"]["backward"]
        assert bwd["attention_backward_calls"] == 1 and bwd["attention_forward_calls"] == 0
        assert bwd["a2a_bytes_sent"] > 0


def test_heads_not_divisible_error_names_the_degrees_that_work(results):
    msg = results("P4")[0]["err-heads"]
    assert msg and "6 query heads" in msg and "multiple of 4" in msg and "degrees that work here: 1, 2" in msg, msg
    assert "hybrid" in msg


def test_degree_not_dividing_the_group_is_an_error(results):
    msg = results("P4")[0]["err-degree"]
    assert msg and "must divide the sequence group's size 4" in msg and "1, 2, 4" in msg, msg


def test_degree_larger_than_the_group_is_an_error(results):
    msg = results("P4")[0]["err-too-big"]
    assert msg and "larger than the sequence group (4 ranks)" in msg, msg
