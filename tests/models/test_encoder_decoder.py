"""Encoder-decoder models (transformers' T5 and BART, 2 ranks, zigzag, fp32).

Source and target of one length: the encoder's self-attention, the decoder's causal
self-attention and the cross-attention all run as the ring (3 attention layers per block pair).
A target shorter than the source: the frame has no one sequence length to split, so it runs
replicated with one warning saying so — exact, and no compile failure on the way (T5's relative
bias index, proved before the lengths were compared, no longer breaks the replicated compile).
"""
import pytest

import encoder_decoder_workers as W
from seqpar_compiler.launch import run_ranks

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def res():
    return run_ranks(W.run_cases, 2, list(W.CASES), timeout=600, pg_timeout=300)


@pytest.mark.parametrize("name", list(W.CASES))
def test_step_is_exact(res, name):
    for rank, r in enumerate(res):
        rr = r[name]
        assert rr["loss"] <= 1e-5 and rr["logits"] <= 1e-5 and rr["grad"] <= 1e-5, (rank, rr)


def test_same_lengths_run_every_attention_as_the_ring(res):
    for r in res:
        assert r["t5-same-lengths"]["ring_calls"] == 6 and not r["t5-same-lengths"]["warnings"], r["t5-same-lengths"]


@pytest.mark.parametrize("name", ["t5-target-shorter", "bart-target-shorter"])
def test_different_lengths_run_replicated_with_one_clear_warning(res, name):
    said = res[0][name]["warnings"]
    assert len(said) == 1 and "no common-length self-attention" in said[0], said
