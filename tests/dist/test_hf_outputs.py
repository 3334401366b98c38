"""What leaves a sequence-parallel Hugging Face model (issue 22), 2-rank spawns (``aot_eager``; the
decoding cases in a ``slow`` spawn of their own):

  * evaluation (``model.eval()`` + ``no_grad``) is sharded and exact;
  * prefill (``use_cache=True, logits_to_keep=1``) and ``generate(max_new_tokens=1)`` are exact, the
    cache held as ``SequenceShard``s; decoding runs replicated with no seqpar compile per token
    (counted over ``max_new_tokens=8``), warned once;
  * saved-tensor hooks never see the passes' fake tensors, per-length specialisation included;
  * a ``SequenceShard`` leaves the group cleanly: pickling refuses with the way out, ``.cpu()`` /
    ``.numpy()`` / ``.tolist()`` / printing gather, and a use after the group is destroyed says so.
"""
import pytest

import hf_outputs_workers as W
from seqpar_compiler.launch import run_ranks


def _spawn(names):
    ranks = run_ranks(W.run_cases, 2, names, timeout=900, pg_timeout=300)
    for r in ranks:
        for name, case in r.items():
            assert "error" not in case, (name, case.get("error"))
    return ranks


@pytest.fixture(scope="module")
def results():
    return _spawn(["eval", "hooks", "exit"])          # "exit" destroys the group: last


@pytest.fixture(scope="module")
def decoding():
    return _spawn(["decode"])


def test_eval_forward_under_no_grad_is_sharded_and_exact(results):
    for r in results:
        assert r["eval"]["type"] == "SequenceShard" and r["eval"]["logits"] <= 1e-5 and r["eval"]["ring_calls"] == 2


@pytest.mark.slow
def test_prefill_is_sharded_and_exact_with_the_cache_as_sequence_shards(decoding):
    for r in decoding:
        d = r["decode"]
        assert d["prefill_ring"] == 2 and d["prefill_logits"] <= 1e-5
        assert d["cache_types"] == ["SequenceShard"] and d["cache_matches"] <= 1e-5


@pytest.mark.slow
def test_generating_one_and_eight_tokens_gives_eager_tokens(decoding):
    assert all(r["decode"]["one_token_equal"] and r["decode"]["tokens_equal"] for r in decoding)


@pytest.mark.slow
def test_decoding_compiles_nothing_per_token(decoding):
    """Eight greedy tokens: the first decode step (cache as SequenceShards) and the second (the
    cache now plain, its length symbolic) are compiled once each; no length is specialised."""
    for r in decoding:
        d = r["decode"]
        assert d["specialised_lengths"] == 0 and d["compiles_while_decoding"] <= 2, d


@pytest.mark.slow
def test_decoding_is_warned_once_by_rank_0(decoding):
    assert [r["decode"]["decode_warnings"] for r in decoding] == [1, 0]


def test_saved_tensor_hooks_see_no_fake_tensor_at_new_lengths(results):
    for r in results:
        h = r["hooks"]
        assert h["fake_packs"] == 0 and h["real_packs"] > 0, h
        assert h["worst_grad"] <= 1e-4 and all(n == 2 for n in h["ring_calls"]), h


def test_a_clone_of_a_shard_stays_a_shard(results):
    assert all(r["exit"]["clone_type"] == "SequenceShard" for r in results)


def test_pickling_or_saving_a_shard_refuses_and_names_the_way_out(results):
    for r in results:
        for how in ("pickle", "torch_save", "torch_save_dict"):
            message = r["exit"][how]
            assert "cannot pickle or torch.save a SequenceShard" in message and "x.full_tensor()" in message, message


def test_reading_a_shard_gathers_the_eager_value(results):
    for r in results:
        e = r["exit"]
        assert e["cpu_type"] == "Tensor" and max(e["cpu"], e["numpy"], e["tolist"]) <= 1e-5 and e["printed"]


def test_using_a_shard_after_its_group_is_destroyed_says_what_happened(results):
    for r in results:
        e = r["exit"]
        for message in (e["after"], e["after_print"]):
            assert "used after that group was destroyed" in message and "x.to_local()" in message, message
        assert e["local_after"] == [1, 16, 128]
