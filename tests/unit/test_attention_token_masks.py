"""Masks from per-token data and positions, proved in one process: key padding in the forms real
code writes it (transformers' ``attention_mask[b, kv]`` gathers, hand-written
``mask[:, None, None, :]`` broadcasts, hidden-key masks), bidirectional local windows, masks
written in place (litgpt's row-by-row loop, ``masked_fill_``), torchtune's Gemma 2 mask, and
what is left alone (a per-query factor, padding hidden by a finite fill, a float padding bias).

Each case: the canonical node's spec and tensors, and the canonicalised graph's value against the
module (the canonical node's single-device meaning), in float64.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seqpar_compiler.kernels import AttentionSpec
from seqpar_compiler.passes.attention_patterns import UNPROVED, canonical_attention, canonicalize_handwritten_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import library_attention_modules as L  # noqa: E402

S, B = 16, 2
PAD = torch.tensor([[True] * S, [False] * 5 + [True] * (S - 5)])        # row 1 left-padded


class PaddedAttention(nn.Module):
    """One attention with a key-padding mask written as ``form`` (causal or not)."""

    def __init__(self, form: str, causal: bool = True):
        super().__init__()
        self.form, self.causal = form, causal
        self.qkv = nn.Linear(32, 96)

    def forward(self, x, pad):
        q, k, v = self.qkv(x).view(B, S, 3, 4, 8).permute(2, 0, 3, 1, 4)
        i = torch.arange(S)
        causal = i[None, :] <= i[:, None]
        if self.form == "gather":                       # transformers' masking_utils
            b = torch.arange(B)[:, None, None, None]
            kv = i[None, None, None, :]
            visible = (kv <= i[None, None, :, None]) & pad.bool()[b, kv]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visible.expand(B, 1, S, S))
        scores = (q @ k.transpose(-2, -1)) * 8 ** -0.5
        if self.form == "broadcast":                    # x-transformers / hand-written
            visible = pad[:, None, None, :] & causal if self.causal else pad[:, None, None, :]
            scores = scores.masked_fill(~visible, float("-inf"))
        elif self.form == "hidden":                     # hidden keys: padding == 0 or future
            hidden = (pad[:, None, None, :] == 0) | ~causal
            scores = scores.masked_fill(hidden, float("-inf"))
        elif self.form == "finite":                     # eager attention's finfo.min fill
            scores = scores.masked_fill(~(pad[:, None, None, :] & causal), torch.finfo(scores.dtype).min)
        elif self.form == "query":                      # a per-query factor: no spec carries it
            scores = scores.masked_fill(~(pad[:, None, :, None] & causal), float("-inf"))
        elif self.form == "float-bias":                 # (1 - m) * min: a float per-key term
            scores = scores + (1.0 - pad[:, None, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
        return scores.softmax(-1).nan_to_num(0.0) @ v


def _canonicalized(module, *inputs):
    """(canonical nodes' args, the attention nodes left with a reason, rel. error vs the module)."""
    torch.manual_seed(0)
    module = module.double() if isinstance(module, nn.Module) else module
    found, reasons = [], []

    def capture(gm, ex):
        static = {n for n in gm.graph.nodes if n.op == "placeholder"
                  and ("_buffers_" in str(n.target) or "_parameters_" in str(n.target))}
        canonicalize_handwritten_attention(gm, ex, static)
        found.extend([a if not isinstance(a, torch.fx.Node) or a.op != "get_attr" else getattr(gm, a.target)
                      for a in n.args] for n in gm.graph.nodes if n.target is canonical_attention)
        reasons.extend(n.meta[UNPROVED] for n in gm.graph.nodes if UNPROVED in n.meta)
        return gm.forward
    torch._dynamo.reset()
    out = torch.compile(module, backend=capture)(*inputs)
    ref = module(*inputs)
    return found, reasons, float((out - ref).norm() / ref.norm())


def _x():
    return torch.randn(B, S, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("form", ["gather", "broadcast", "hidden"])
def test_key_padding_is_carried_as_per_key_validity(form):
    found, _, err = _canonicalized(PaddedAttention(form), _x(), PAD)
    assert len(found) == 1 and err < 1e-12
    spec = AttentionSpec.decode(found[0][3])
    assert spec.causal and spec.key_padding and found[0][5] is not None


def test_key_padding_without_causality_is_an_encoder_padding_mask():
    found, _, err = _canonicalized(PaddedAttention("broadcast", causal=False), _x(), PAD)
    spec = AttentionSpec.decode(found[0][3])
    assert not spec.positional and spec.key_padding and err < 1e-12


def test_padding_hidden_by_a_finite_fill_is_left_alone_with_the_reason():
    found, reasons, err = _canonicalized(PaddedAttention("finite"), _x(), PAD)
    assert found == [] and err < 1e-12
    assert reasons and "finite fill" in reasons[0]


@pytest.mark.parametrize("form", ["query", "float-bias"])
def test_other_per_token_factors_are_left_alone(form):
    found, _, err = _canonicalized(PaddedAttention(form), _x(), PAD)
    assert found == [] and err < 1e-12


def _ids():
    return torch.randint(0, 128, (B, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant", ["window", "softcap", "loop"])
def test_litgpt_masks_are_proved_windows_with_their_in_place_writes(variant):
    """litgpt builds its window as triu/tril of -inf, its soft-capped mask with masked_fill_, and
    (older) a window row by row in a Python loop: each write is evaluated where the mask is read."""
    found, _, err = _canonicalized(L.LitGPTModel(variant), _ids())
    specs = [AttentionSpec.decode(a[3]) for a in found]
    assert [s.window for s in specs] == [8, None] and all(s.causal for s in specs)
    assert err < 1e-6               # the soft-capped path's softmax runs in fp32 (dtype=torch.float)
    assert all((s.softcap is not None) == (variant == "softcap") for s in specs)


def test_torchtune_gemma2_window_on_some_layers_with_softcap():
    found, _, err = _canonicalized(L.TorchtuneGemma2Model(), _ids())
    specs = [AttentionSpec.decode(a[3]) for a in found]
    assert [s.window for s in specs] == [8, None] and all(s.softcap == 50.0 for s in specs)
    assert err < 1e-6               # softmax(output.float()): fp32 in the module


class MHAPadding(nn.Module):
    """``nn.MultiheadAttention`` self-attention with a bool ``key_padding_mask`` (True = ignore)."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x, pad):
        mask = torch.ones(S, S, dtype=torch.bool).triu(1) if self.causal else None
        return self.mha(x, x, x, key_padding_mask=~pad, attn_mask=mask, need_weights=False)[0]


@pytest.mark.parametrize("causal", [False, True])
def test_multihead_attention_key_padding_mask_is_key_validity(causal):
    pad = torch.tensor([[True] * S, [True] * (S - 4) + [False] * 4])      # right padding: no empty row
    found, _, err = _canonicalized(MHAPadding(causal), _x(), pad)
    spec = AttentionSpec.decode(found[0][3])
    assert len(found) == 1 and spec.key_padding and spec.causal == causal and err < 1e-12


@pytest.mark.slow
def test_symmetric_alibi_of_an_encoder_is_a_table_of_the_offset():
    """x-transformers' encoder ALiBi, −slope·|j − i| on 2 of 4 heads: no signed slope fits, a per-head
    function of j − i does (the ring evaluates it per block from a [H, 2S − 1] table)."""
    import x_transformers as xt
    model = xt.TransformerWrapper(num_tokens=128, max_seq_len=64, attn_layers=xt.Encoder(
        dim=64, depth=2, heads=4, alibi_pos_bias=True, alibi_num_heads=2))
    found, _, err = _canonicalized(model, _ids())
    specs = [AttentionSpec.decode(a[3]) for a in found]
    assert len(specs) == 2 and all(s.rel_bias and not s.alibi and not s.positional for s in specs)
    table = found[0][7]
    assert table.shape == (4, 63) and torch.equal(table[2:], torch.zeros(2, 63))      # unbiased heads 2, 3
    assert err < 1e-6


def _t5_encoder(impl: str):
    import transformers
    cfg = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                dropout_rate=0.0)
    torch.manual_seed(0)
    encoder = transformers.T5EncoderModel(cfg).double().train()
    encoder.set_attn_implementation(impl)
    return encoder


@pytest.mark.parametrize("impl", [pytest.param("eager", marks=pytest.mark.slow), "sdpa"])
def test_learned_relative_bias_of_t5_is_a_table_of_the_offset_with_its_gradient(impl):
    """T5's bucketed bias, an embedding of bucket(j − i) computed once and added in every layer
    (eager: to the scores; SDPA: as the float mask): each attention gets the [H, 2S − 1] table
    ``embedding(bucket index of each offset, W)ᵀ`` computed in the graph, so W's gradient (and
    every other) is the model's."""
    encoder, ref = _t5_encoder(impl), _t5_encoder(impl)
    found, reasons, err = _canonicalized(lambda ids: encoder(input_ids=ids).last_hidden_state, _ids())
    specs = [AttentionSpec.decode(a[3]) for a in found]
    assert len(specs) == 2 and all(s.rel_bias and not s.alibi and not s.positional for s in specs), specs
    assert all(isinstance(a[7], torch.fx.Node) for a in found) and reasons == [] and err < 1e-12
    torch._dynamo.reset()
    grads = []
    for model, run in ((encoder, torch.compile(encoder, backend=_canonicalizing)), (ref, ref)):
        run(input_ids=_ids()).last_hidden_state.pow(2).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    bias = ref.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad
    assert bias is not None and bias.abs().sum() > 0
    for g, r in zip(*grads):
        assert float((g - r).norm() / r.norm()) < 1e-12


def _canonicalizing(gm, ex):
    static = {n for n in gm.graph.nodes if n.op == "placeholder"
              and ("_buffers_" in str(n.target) or "_parameters_" in str(n.target))}
    assert canonicalize_handwritten_attention(gm, ex, static) == 2
    return gm.forward


def test_learned_bias_that_is_no_function_of_the_offset_is_left_alone_with_the_reason():
    """A learned bias per (query, key) position pair (an S × S parameter) is no table of j − i: left
    alone, and the warning says why."""
    class PairBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 96)
            self.bias = nn.Parameter(torch.randn(4, S, S))

        def forward(self, x):
            q, k, v = self.proj(x).view(B, S, 3, 4, 8).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-1, -2) * 8 ** -0.5 + self.bias[None]
            return scores.softmax(-1) @ v
    found, reasons, err = _canonicalized(PairBias(), _x())
    assert found == [] and reasons and "learned function of k - q" in reasons[0] and err < 1e-12


class BucketBiasDecoder(nn.Module):
    """A decoder's learned bias written by hand: ``nn.Embedding(buckets, H)`` looked up at a
    one-sided bucket of q − k (clamped), added to causal scores."""

    def __init__(self, scale_grad_by_freq=False):
        super().__init__()
        self.proj = nn.Linear(32, 96)
        self.bias = nn.Embedding(6, 4, scale_grad_by_freq=scale_grad_by_freq)

    def forward(self, x):
        q, k, v = self.proj(x).view(B, S, 3, 4, 8).permute(2, 0, 3, 1, 4)
        pos = torch.arange(S)
        bucket = (pos[:, None] - pos[None, :]).clamp(0, 5)                      # [S, S]
        scores = q @ k.transpose(-1, -2) * 8 ** -0.5 + self.bias(bucket).permute(2, 0, 1)[None]
        scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        return scores.softmax(-1) @ v


def test_a_decoders_learned_bucket_bias_is_a_causal_table_with_its_gradient():
    module, ref = BucketBiasDecoder().double(), BucketBiasDecoder().double()
    ref.load_state_dict(module.state_dict())
    found, reasons, err = _canonicalized(module, _x())
    spec = AttentionSpec.decode(found[0][3])
    assert len(found) == 1 and spec.causal and spec.rel_bias and reasons == [] and err < 1e-12
    torch._dynamo.reset()

    def canonicalizing(gm, ex):
        static = {n for n in gm.graph.nodes if n.op == "placeholder" and "_parameters_" in str(n.target)}
        assert canonicalize_handwritten_attention(gm, ex, static) == 1
        return gm.forward
    torch.compile(module, backend=canonicalizing)(_x()).pow(2).sum().backward()
    ref(_x()).pow(2).sum().backward()
    for p, r in zip(module.parameters(), ref.parameters()):
        assert float((p.grad - r.grad).norm() / r.grad.norm()) < 1e-12


def test_a_learned_bias_scaled_by_index_frequency_is_left_alone():
    """``scale_grad_by_freq`` scales the weight's gradient by how often each index occurs, which
    the [2S − 1] table does not reproduce: left alone, with the reason."""
    found, reasons, err = _canonicalized(BucketBiasDecoder(scale_grad_by_freq=True), _x())
    assert found == [] and reasons and "learned function of k - q" in reasons[0] and err < 1e-12
