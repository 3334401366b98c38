"""One training step of a real model whose attention is a form the ring carries as per-token,
per-head or positional data (key padding, right or left; bidirectional local windows; ALiBi;
windows built in place or on some layers), through seqpar on each spawned rank, against the same
step in this process.

transformers models come from ``real_model_zoo`` (tiny configs, random weights; the case sets the
attention implementation and the padding side); x-transformers is the installed library;
litgpt and torchtune are the faithful models of ``library_attention_modules``. A case never
raises: it returns what happened, as ``real_model_workers.real_model_case`` does, so one spawn
reports every case.
"""
from __future__ import annotations

import os
import sys
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))        # tests/step_probes.py

import seqpar_compiler as sp  # noqa: E402
from real_model_workers import _fallback_kind, _rel  # noqa: E402
from real_model_zoo import VOCAB, build  # noqa: E402

__all__ = ["attention_form_case", "run_attention_forms"]


def _batch(arch: str, padding: str | None, B: int, S: int, pad: int = 7) -> dict:
    """ids and labels, with a padding mask on the second row (right: its last ``pad`` tokens;
    left: its first ``pad``, as batched generation pads decoders). Encoders get masked-LM labels."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    kwargs = {"input_ids": ids}
    if arch not in ("bert", "modernbert"):
        kwargs["use_cache"] = False
    labels = ids
    if padding is not None:
        mask = torch.ones(B, S, dtype=torch.long)
        if padding == "right":
            mask[1, S - pad:] = 0
        else:
            mask[1, :pad] = 0
        kwargs["attention_mask"] = mask
        labels = torch.where(mask.bool(), ids, -100)
    kwargs["labels"] = labels
    return kwargs


_ARCH = {"llama": "llama", "bert": "bert-padded", "modernbert": "modernbert-padded", "bloom": "bloom-alibi",
         "mpt": "mpt-alibi"}


def _library_model(arch: str) -> torch.nn.Module:
    """A model that maps ids [B, S] to logits [B, S, VOCAB] (not transformers)."""
    import library_attention_modules as L
    if arch in ("xt-decoder-alibi", "xt-encoder-alibi"):   # ALiBi on 2 of 4 heads (alibi_num_heads)
        import x_transformers as xt
        layers = xt.Decoder if arch == "xt-decoder-alibi" else xt.Encoder     # encoder: −slope·|j − i|
        return xt.TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, attn_layers=layers(
            dim=64, depth=2, heads=4, alibi_pos_bias=True, alibi_num_heads=2))
    if arch.startswith("t5-encoder"):          # T5's learned bias of bucket(k - q), shared by the layers
        return _T5Logits("eager" if arch.endswith("-eager") else "sdpa")
    if arch.startswith("litgpt-"):
        return L.LitGPTModel(arch.split("-", 1)[1], vocab=VOCAB)
    if arch == "torchtune-gemma2":
        return L.TorchtuneGemma2Model(vocab=VOCAB)
    raise ValueError(f"unknown architecture {arch!r}")


class _T5Logits(torch.nn.Module):
    """transformers' T5 encoder (tiny config) with a vocabulary head: ids → logits."""

    def __init__(self, impl: str):
        super().__init__()
        import transformers
        cfg = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                    dropout_rate=0.0)
        self.encoder = transformers.T5EncoderModel(cfg)
        self.encoder.set_attn_implementation(impl)
        self.head = torch.nn.Linear(64, VOCAB, bias=False)

    def forward(self, input_ids):
        return self.head(self.encoder(input_ids=input_ids).last_hidden_state)


class _WithLoss(torch.nn.Module):
    """ids → an output with ``.logits`` and the next-token ``.loss``, as transformers models return."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        from types import SimpleNamespace
        logits = self.model(input_ids)
        # transformers' ForCausalLMLoss: labels shifted by a pad, logits whole
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1),
                                                 ignore_index=-100)
        return SimpleNamespace(logits=logits, loss=loss)


def _build(arch: str) -> torch.nn.Module:
    if arch in _ARCH:
        return build(_ARCH[arch])
    torch.manual_seed(0)
    return _WithLoss(_library_model(arch)).train()


def attention_form_case(rank: int, P: int, *, arch: str, padding: str | None = None, impl: str | None = None,
                        B: int = 2, S: int = 32, inner: str = "aot_eager", **options) -> dict:
    """``arch`` (llama, bert, modernbert, bloom, mpt) with attention implementation ``impl``
    (None: the model's default) and ``padding`` (None, "right", "left")."""
    from step_probes import SequenceGatherCounter
    result = {}
    try:
        model, ref = _build(arch), _build(arch)
        ref.load_state_dict(model.state_dict())
        if impl is not None:
            for m in (model, ref):
                m.set_attn_implementation(impl)
        kwargs = _batch(arch, padding, B, S)
        if arch not in _ARCH:
            kwargs = {"input_ids": kwargs["input_ids"], "labels": kwargs["labels"]}
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=sp.backend(inner=inner, **options))
        saved = []

        def pack(t):
            saved.append(tuple(t.shape))
            return t
        with warnings.catch_warnings(record=True) as caught, sp.stats() as st, SequenceGatherCounter() as gathers:
            warnings.simplefilter("always")
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = compiled(**kwargs)
            out.loss.backward()
            logits = out.logits.detach().clone()
            loss = out.loss.detach()
        r = ref(**kwargs)
        r.loss.backward()
        ref_grads = [q.grad for q in ref.parameters() if q.grad is not None]
        floor = 1e-5 * float(torch.stack([g.double().norm() for g in ref_grads]).norm())
        grads = {n: _rel(p.grad, q.grad, floor) if p.grad is not None else float("inf")
                 for (n, p), q in zip(model.named_parameters(), ref.parameters()) if q.grad is not None}
        messages = [str(w.message) for w in caught if "seqpar" in str(w.message)]
        worst = max(grads.items(), key=lambda kv: kv[1])
        result.update(loss=_rel(loss, r.loss), logits=_rel(logits, r.logits), worst_grad=worst,
                      ring_calls=st.attention_forward_calls, gathers=gathers.calls, warnings=messages,
                      fallbacks=_fallback_kind(messages), layers=_layers(model),
                      # saved for backward with a row of all S keys (an S x S score or bias matrix)
                      saved_scores=[x for x in saved if len(x) >= 2 and x[-1] == S and x[-2] in (S, S // P)],
                      learned_bias_grads={n: e for n, e in grads.items() if "relative_attention_bias" in n})
        result["exact"] = result["loss"] <= 1e-5 and result["logits"] <= 1e-5 and worst[1] <= 1e-4
    except Exception as err:  # noqa: BLE001 - a case reports a crash, it does not stop the spawn
        result.update(exact=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
    return result


def _layers(model) -> int:
    config = getattr(model, "config", None)
    return config.num_hidden_layers if config is not None else 2          # the library models have 2


def run_attention_forms(rank: int, P: int, cases: list[tuple[str, dict]]) -> dict:
    return {name: attention_form_case(rank, P, **kw) for name, kw in cases}
