"""Hand-written attention → canonical attention, with masks proved by evaluation."""
import sys
from pathlib import Path

import torch

from seqpar_compiler.passes.attention_patterns import canonical_attention, canonicalize_handwritten_attention
from seqpar_compiler.kernels import AttentionSpec
from seqpar_compiler.passes.mask_proof import band_of

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from models import GPT, GPTConfig  # noqa: E402

S = 12


def _tril(k=0):
    return torch.ones(S, S, dtype=torch.bool).tril(k)


def test_bands_are_recognised_exactly():
    assert band_of(torch.ones(1, 1, S, S, dtype=torch.bool), S) == AttentionSpec()
    assert band_of(_tril()[None, None], S) == AttentionSpec.of(causal=True)
    assert band_of((_tril() & ~_tril(-4))[None], S) == AttentionSpec.of(causal=True, window=4)
    local = _tril(3) & ~_tril(-4)                      # ModernBERT's |q - kv| <= 3
    assert band_of(local[None], S) == AttentionSpec(behind=3, ahead=3)
    prefix = _tril().clone()
    prefix[:3, :3] = True
    assert band_of(prefix, S) is None
    batch = torch.stack([_tril(), _tril(-1)])          # rows differ across the batch
    assert band_of(batch, S) is None
    assert band_of(_tril(-1)[None], S) is None         # row 0 sees no key: no band


def _canonicalized(cfg):
    torch.manual_seed(0)
    model = GPT(cfg)
    graphs = []

    def capture(gm, ex):
        static = {n for n in gm.graph.nodes
                  if n.op == "placeholder" and ("_buffers_" in str(n.target) or "_parameters_" in str(n.target))}
        graphs.append(canonicalize_handwritten_attention(gm, ex, static))
        return gm.forward
    idx = torch.randint(0, 256, (2, S))
    torch._dynamo.reset()
    out = torch.compile(model, backend=capture)(idx)
    return graphs[0], out, model(idx)


def test_nanogpt_tril_buffer_attention_is_canonicalized_and_unchanged_in_value():
    count, out, ref = _canonicalized(GPTConfig(attention="manual"))
    assert count == 2 and torch.allclose(out, ref, atol=1e-5)


def test_window_mask_from_arange_is_canonicalized_and_unchanged_in_value():
    count, out, ref = _canonicalized(GPTConfig(attention="manual", window=3))
    assert count == 2 and torch.allclose(out, ref, atol=1e-5)


def test_prefix_lm_mask_is_left_alone():
    count, out, ref = _canonicalized(GPTConfig(attention="manual", prefix=4))
    assert count == 0 and torch.allclose(out, ref, atol=1e-5)


def test_canonical_attention_means_masked_softmax_attention():
    q, k, v = (torch.randn(1, 4, S, 8, dtype=torch.float64) for _ in range(3))
    s = (q @ k.transpose(-1, -2)) * 0.3
    vis = _tril() & ~_tril(-5)
    ref = torch.softmax(s.masked_fill(~vis, float("-inf")), -1) @ v
    assert torch.allclose(canonical_attention(q, k, v, AttentionSpec.of(causal=True, window=5, scale=0.3).encode()),
                          ref)


def test_packed_document_mask_is_proved_causal_with_document_ids():
    from models import PackedDocAttention
    torch.manual_seed(0)
    model = PackedDocAttention()
    x = torch.randn(2, S, 32)
    doc = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])
    found = []

    def capture(gm, ex):
        static = {n for n in gm.graph.nodes if n.op == "placeholder" and "_parameters_" in str(n.target)}
        found.append(canonicalize_handwritten_attention(gm, ex, static))
        found.append([n.args for n in gm.graph.nodes if n.target is canonical_attention])
        return gm.forward
    torch._dynamo.reset()
    out = torch.compile(model, backend=capture)(x, doc)
    assert found[0] == 1
    q, k, v, spec, doc_node, *_ = found[1][0]
    spec = AttentionSpec.decode(spec)
    assert spec.causal and spec.window is None and spec.docs and doc_node is not None
    assert torch.allclose(out, model(x, doc), atol=1e-6)


class _PositionPackedAttention(torch.nn.Module):
    """Attention over documents packed by restarting position ids, masked the way transformers 5
    builds it: documents numbered by ``(diff(pos) != 1).cumsum``, causality (and a window) by
    comparing position ids; ``extra`` adds one more factor reading the positions."""

    def __init__(self, window=None, extra=None, step=1):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.window, self.extra, self.step = window, extra, step

    def forward(self, x, pos, other):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, 2, 8).permute(2, 0, 3, 1, 4)
        doc = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != self.step).cumsum(-1)
        b = torch.arange(B)[:, None, None, None]
        qi = torch.arange(T)[None, None, :, None]
        ki = torch.arange(T)[None, None, None, :]
        mask = (doc[b, qi] == doc[b, ki]) & (pos[b, ki] <= pos[b, qi])
        if self.window is not None:
            mask = mask & (pos[b, ki] > pos[b, qi] - self.window)
        if self.extra == "constant":
            mask = mask & (pos[b, ki] >= 2)
        elif self.extra == "other":
            mask = mask & (other[b, ki] <= other[b, qi])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(B, 1, T, T))


def _packed_positions_canonicalized(**kw):
    torch.manual_seed(0)
    model = _PositionPackedAttention(**kw)
    x = torch.randn(2, S, 16)
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(7)]), torch.cat([torch.arange(3, 12), torch.arange(3)])])
    other = torch.randint(0, 5, (2, S))
    found = []

    def capture(gm, ex):
        static = {n for n in gm.graph.nodes if n.op == "placeholder" and "_parameters_" in str(n.target)}
        canonicalize_handwritten_attention(gm, ex, static)
        found.extend(n.args for n in gm.graph.nodes if n.target is canonical_attention)
        return gm.forward
    torch._dynamo.reset()
    out = torch.compile(model, backend=capture)(x, pos, other)
    assert torch.allclose(out, model(x, pos, other), atol=1e-6)
    return found


def test_position_id_comparisons_of_packed_documents_are_proved_causal():
    """Within a document numbered from the position ids they step by +1, so comparing them is
    comparing token indices: causal with document ids."""
    [(q, k, v, spec, doc, *_)] = _packed_positions_canonicalized()
    spec = AttentionSpec.decode(spec)
    assert spec.causal and spec.window is None and doc is not None


def test_position_id_window_of_packed_documents_is_proved_a_window():
    [(q, k, v, spec, doc, *_)] = _packed_positions_canonicalized(window=3)
    spec = AttentionSpec.decode(spec)
    assert spec.causal and spec.window == 3 and doc is not None


def test_position_ids_compared_with_a_constant_are_not_proved():
    """``pos[kv] >= 2`` depends on where the document starts, not on the index difference."""
    assert _packed_positions_canonicalized(extra="constant") == []


def test_comparisons_of_another_tensor_are_not_proved():
    assert _packed_positions_canonicalized(extra="other") == []


def test_documents_not_numbered_by_unit_steps_are_not_proved():
    """``(diff != 2).cumsum`` does not make positions step by one inside a document."""
    assert _packed_positions_canonicalized(step=2) == []


def test_qwen2_eager_attention_is_canonicalized_erasing_each_dead_node_once():
    """The mask chain of transformers' Qwen2 reaches ``position_ids`` twice; erasing it twice was
    torch.fx's 'erase_node(position_ids_2) on an already erased node' warning."""
    import warnings

    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    counts = []

    def capture(gm, ex):
        static = {n for n in gm.graph.nodes if n.op == "placeholder"
                  and ("_parameters_" in str(n.target) or "_buffers_" in str(n.target))}
        counts.append(canonicalize_handwritten_attention(gm, ex, static))
        return gm.forward
    ids = torch.randint(0, 64, (2, S))
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend=capture)(ids, use_cache=False).logits
    assert counts == [2]
    assert not [w for w in caught if "erase" in str(w.message)]
    assert torch.allclose(out, model(ids, use_cache=False).logits, atol=1e-5)
