"""transformers models with other heads than a causal LM (tiny configs) through seqpar on each
spawned rank, against the same step in one process (test_transformers_heads.py): encoder-decoders
(T5, BART) and sequence classifiers (Llama's last-token pooling, BERT's and RoBERTa's [CLS])."""
from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

__all__ = ["CASES", "run_cases"]


def _t5():
    import transformers
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0))


def _bart():
    import transformers
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2))


def _llama_classifier():
    import transformers
    return transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0))


def _encoder_classifier(kind):
    def build():
        import transformers
        cfg = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                   max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                   classifier_dropout=0.0, num_labels=3, pad_token_id=1)
        if kind == "bert":
            return transformers.BertForSequenceClassification(transformers.BertConfig(**cfg))
        return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**cfg))
    return build


# name -> (builder, source length, target length; None: a class per sequence)
CASES = {"t5-same-lengths": (_t5, 32, 32), "t5-target-shorter": (_t5, 32, 8), "bart-target-shorter": (_bart, 32, 12),
         "llama-sequence-classifier": (_llama_classifier, 32, None),
         "bert-sequence-classifier": (_encoder_classifier("bert"), 32, None),
         "roberta-sequence-classifier": (_encoder_classifier("roberta"), 32, None)}


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def case(rank: int, P: int, name: str) -> dict:
    import seqpar_compiler as sp
    build, S, T = CASES[name]
    torch.manual_seed(0)
    model = build().train()
    ref = build().train()
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, S), generator=g)
    if build is _llama_classifier:
        ids[1, -5:] = 0                     # right padding (pad id 0): row 1 pools an earlier token
    labels = torch.randint(0, 3, (2,), generator=g) if T is None else torch.randint(3, 128, (2, T), generator=g)
    kw = {"input_ids": ids, "labels": labels}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=sp.backend(inner="aot_eager", schedule="zigzag"))
    with warnings.catch_warnings(record=True) as caught, sp.stats() as st:
        warnings.simplefilter("always")
        out = compiled(**kw)
        out.loss.backward()
    r = ref(**kw)
    r.loss.backward()
    # a key projection's bias gets a gradient that is zero in exact arithmetic (softmax ignores a
    # per-query constant): compare every gradient against the whole gradient's norm
    total = float(torch.stack([q.grad.double().norm() for q in ref.parameters() if q.grad is not None]).norm())
    worst = max(float((p.grad.double() - q.grad.double()).norm()) / total
                for p, q in zip(model.parameters(), ref.parameters()) if q.grad is not None)
    return {"loss": _rel(out.loss, r.loss), "logits": _rel(out.logits, r.logits), "grad": worst,
            "ring_calls": st.attention_forward_calls,
            "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)]}


def run_cases(rank: int, P: int, names: list[str]) -> dict:
    return {n: case(rank, P, n) for n in names}
