"""Whole models through `torch.compile(backend="seqpar")` on 2 and 4 gloo ranks against
single-process eager (issue 3): loss and outputs within 1e-5, every parameter gradient within 1e-4."""
import pytest

import model_workers as W
from seqpar_compiler.launch import run_ranks

SCHEDULES = ["ring", "zigzag", "striped", "distflash"]

CASES = {
    2: [(f"{m}-{s}", "train", dict(model=m, schedule=s)) for m in ("gpt", "llama") for s in SCHEDULES] + [
        ("gpt-inductor", "train", dict(model="gpt", schedule="zigzag", inner="inductor")),
        ("gpt-manual-zigzag", "train", dict(model="gpt-manual", schedule="zigzag")),
        ("gpt-tagged-pointwise", "train", dict(model="gpt-tagged-pointwise", schedule="zigzag")),
        ("gpt-window-ring", "train", dict(model="gpt-window", schedule="ring")),
        ("gpt-window-striped", "train", dict(model="gpt-window", schedule="striped")),
        ("gpt-prefix-lm", "train", dict(model="gpt-prefix-lm", schedule="zigzag", expect_fallback=True)),
        ("llama-bf16-autocast", "train", dict(model="llama", schedule="zigzag", autocast=True)),
        ("gpt-local-output", "local", dict(model="gpt")),
        ("llama-grad-reduce-none", "grad_none", dict(model="llama")),
        ("fft-fallback", "fallback", dict()),
        ("fft-fallback-error", "fallback", dict(fallback="error")),
        ("indivisible", "indivisible", dict()),
        ("llama-structure", "structure", dict()),
        ("packed-docs-zigzag", "packed", dict(schedule="zigzag")),
        ("packed-docs-striped", "packed", dict(schedule="striped")),
    ],
    4: [("gpt-zigzag", "train", dict(model="gpt", schedule="zigzag")),
        ("llama-striped", "train", dict(model="llama", schedule="striped")),
        ("llama-distflash", "train", dict(model="llama", schedule="distflash"))],
}


@pytest.fixture(scope="module")
def results():
    cache = {}

    def get(P):
        if P not in cache:
            cache[P] = run_ranks(W.run_cases, P, CASES[P], timeout=900, pg_timeout=300)
        return cache[P]
    return get


TRAIN = [(P, name) for P, cases in CASES.items() for name, kind, kw in cases
         if kind == "train" and not kw.get("autocast") and not kw.get("expect_fallback")]


@pytest.mark.parametrize("P,name", TRAIN, ids=[f"P{P}-{n}" for P, n in TRAIN])
def test_training_step_matches_single_device_eager(results, P, name):
    for rank, res in enumerate(results(P)):
        r = res[name]
        worst = max(r["grads"].items(), key=lambda kv: kv[1])
        print(f"P={P} {name} rank {rank}: loss {r['loss']:.1e} logits {r['logits']:.1e} worst grad {worst}")
        assert r["loss"] <= 1e-5 and r["logits"] <= 1e-5
        assert worst[1] <= 1e-4, worst
        assert not [w for w in r["warnings"] if "cannot shard" in w], r["warnings"]


def test_gpt_compiles_to_one_frame_without_graph_breaks(results):
    assert all(res["gpt-zigzag"]["frames"] == 1 for res in results(2))


def test_bf16_autocast_step_within_bf16_tolerance(results):
    for res in results(2):
        r = res["llama-bf16-autocast"]
        assert r["loss"] <= 1e-2 and r["logits"] <= 5e-2, r
        assert max(r["grads"].values()) <= 1e-1, r["grads"]


def test_local_output_keeps_this_ranks_shard(results):
    for res in results(2):
        r = res["gpt-local-output"]
        assert r["shape"][1] == 16 and r["err"] <= 1e-5, r


def test_grad_reduce_none_leaves_partial_gradients_that_sum_to_the_full_one(results):
    for res in results(2):
        errs = res["llama-grad-reduce-none"]
        assert max(errs.values()) <= 1e-4, errs


def test_unsupported_sequence_op_falls_back_with_a_warning_and_stays_correct(results):
    for rank, res in enumerate(results(2)):
        r = res["fft-fallback"]
        assert r["error"] is None and r["err"] <= 1e-5, r
        said = [w for w in r["warnings"] if "fft" in w and "test_models" not in w]
        assert len(said) == (1 if rank == 0 else 0), r["warnings"]      # once per group, by rank 0


def test_fallback_error_mode_raises_naming_the_op(results):
    for res in results(2):
        err = res["fft-fallback-error"]["error"]
        assert "fft" in err and "SEQPAR_FALLBACK=error" in err, err


def test_sequence_length_that_cannot_be_split_is_a_clear_error(results):
    for res in results(2):
        assert "must be a multiple of 4" in res["indivisible"], res["indivisible"]


def test_sharded_llama_graph_holds_no_full_length_sequence_tensor(results):
    for res in results(2):
        r = res["llama-structure"]
        assert r["ring_nodes"] == 2, r
        assert r["full"] == [], r["full"]


def test_hand_written_attention_with_an_unprovable_mask_falls_back_and_stays_exact(results):
    """A prefix-LM mask is neither causal nor a window: never treated as causal."""
    for rank, res in enumerate(results(2)):
        r = res["gpt-prefix-lm"]
        assert r["loss"] <= 1e-5 and r["logits"] <= 1e-5 and max(r["grads"].values()) <= 1e-4
        # said once, by rank 0, naming the unprovable mask (issue 16)
        said = [w for w in r["warnings"] if "runs replicated" in w and "cannot prove" in w]
        assert len(said) == (1 if rank == 0 else 0), r["warnings"]
        assert r["ring_calls"] == 0


def test_hand_written_attention_becomes_ring_attention(results):
    for res in results(2):
        assert res["gpt-manual-zigzag"]["ring_calls"] > 0 and res["gpt-window-ring"]["ring_calls"] > 0


@pytest.mark.parametrize("name", ["packed-docs-zigzag", "packed-docs-striped"])
def test_packed_document_mask_runs_as_ring_attention_with_document_ids(results, name):
    for res in results(2):
        r = res[name]
        assert r["ring_calls"] == 1 and not r["warnings"], r
        assert r["loss"] <= 1e-5 and max(r["grads"].values()) <= 1e-4, r
