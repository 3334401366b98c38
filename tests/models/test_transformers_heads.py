"""transformers models with other heads (2 ranks, zigzag, fp32): encoder-decoders (T5, BART) and
sequence classifiers.

Sequence classifiers: Llama pools each row's last non-padding token (``argmax`` over the sequence,
``logits[arange(B), last]``), BERT and RoBERTa the [CLS] token (``hidden[:, 0]``); each picks its
rows on the rank that holds them and all-reduces: the ring in every layer, nothing gathered, no
warning.

Source and target of one length: the encoder's self-attention, the decoder's causal
self-attention and the cross-attention all run as the ring (3 attention layers per block pair).
A target shorter than the source (summarising a long document): the frame splits the source,
so the encoder runs sharded (its attention the ring), the decoder's self-attention runs whole
and the cross-attention reads the gathered encoder keys/values, both said — exact.
"""
import pytest

import transformers_heads_workers as W
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
def test_a_shorter_target_leaves_the_encoder_sharded_and_says_what_runs_whole(res, name):
    for r in res:
        assert r[name]["ring_calls"] == 2, r[name]            # the two encoder layers
    said = res[0][name]["warnings"]
    assert any("another length" in w for w in said), said          # the decoder's self-attention
    assert any("cannot shard scaled_dot_product_attention" in w for w in said), said     # cross-attention
    assert not any("failed" in w for w in said), said


@pytest.mark.parametrize("name", ["llama-sequence-classifier", "bert-sequence-classifier",
                                  "roberta-sequence-classifier"])
def test_sequence_classifiers_pool_without_a_gather(res, name):
    for r in res:
        assert r[name]["ring_calls"] == 2 and not r[name]["warnings"], r[name]
