"""Hand-written attention → canonical attention, with masks proved by evaluation."""
import sys
from pathlib import Path

import torch

from seqpar_compiler.passes.attention_patterns import (_mask_kind, canonical_attention,
                                                       canonicalize_handwritten_attention)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from models import GPT, GPTConfig  # noqa: E402

S = 12


def _tril(k=0):
    return torch.ones(S, S, dtype=torch.bool).tril(k)


def test_mask_kinds_are_recognised_exactly():
    assert _mask_kind(torch.ones(1, 1, S, S, dtype=torch.bool), S) == (False, None)
    assert _mask_kind(_tril()[None, None], S) == (True, None)
    assert _mask_kind((_tril() & ~_tril(-4))[None], S) == (True, 4)
    prefix = _tril().clone()
    prefix[:3, :3] = True
    assert _mask_kind(prefix, S) is None
    batch = torch.stack([_tril(), _tril(-1)])          # rows differ across the batch
    assert _mask_kind(batch, S) is None


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
    assert torch.allclose(canonical_attention(q, k, v, True, 5, None, 0.3), ref)


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
    q, k, v, causal, window, doc_node, scale = found[1][0]
    assert causal is True and window is None and doc_node is not None
    assert torch.allclose(out, model(x, doc), atol=1e-6)
