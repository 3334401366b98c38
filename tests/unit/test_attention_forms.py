"""Attention written the ways real codebases write it → one canonical attention node whose
single-device meaning equals the module (float64), with masks and ALiBi slopes proved by
evaluation and everything unprovable left alone (issue 12)."""
import sys
from pathlib import Path

import pytest
import torch

from seqpar_compiler.passes.attention_patterns import canonical_attention, canonicalize_handwritten_attention
from seqpar_compiler.passes.score_bias import fit_alibi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import attention_modules as M  # noqa: E402

S = 16


def _canonicalized(module, x=None):
    """(canonical nodes' args, rel. error of the canonicalised graph vs the module) in float64."""
    torch.manual_seed(0)
    module = module.double()
    x = torch.randn(2, S, 32, dtype=torch.float64) if x is None else x
    found = []

    def capture(gm, ex):
        static = {n for n in gm.graph.nodes if n.op == "placeholder"
                  and ("_buffers_" in str(n.target) or "_parameters_" in str(n.target))}
        canonicalize_handwritten_attention(gm, ex, static)
        found.extend([a if not isinstance(a, torch.fx.Node) or a.op != "get_attr" else getattr(gm, a.target)
                      for a in n.args] for n in gm.graph.nodes if n.target is canonical_attention)
        return gm.forward
    torch._dynamo.reset()
    out = torch.compile(module, backend=capture)(x)
    ref = module(x)
    return found, float((out - ref).norm() / ref.norm())


def _only(found):
    assert len(found) == 1, f"{len(found)} canonical attention nodes"
    args = found[0] + [None] * (9 - len(found[0]))
    return dict(zip(["q", "k", "v", "causal", "window", "doc", "scale", "slopes", "softcap"], args))


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_einsum_scores_with_einops_and_finfo_max_fill_are_causal(layout):
    found, err = _canonicalized(M.EinsumAttention(layout=layout))
    a = _only(found)
    assert (a["causal"], a["window"], a["slopes"]) == (True, None, None) and err < 1e-12


def test_einsum_window_mask_from_arange_is_a_window():
    found, err = _canonicalized(M.EinsumAttention(window=4))
    a = _only(found)
    assert (a["causal"], a["window"]) == (True, 4) and err < 1e-12


def test_baddbmm_scores_with_where_on_a_tril_buffer_are_causal_with_alpha_as_scale():
    found, err = _canonicalized(M.BaddbmmAttention())
    a = _only(found)
    assert a["causal"] is True and a["scale"] == pytest.approx(8 ** -0.5) and err < 1e-12


@pytest.mark.parametrize("form,causal", [("signed", True), ("mpt", True), ("bidirectional", False)])
def test_alibi_bias_is_proved_as_per_head_slopes(form, causal):
    """The signed form, MPT's key-only form (a per-row constant away) and no mask at all."""
    found, err = _canonicalized(M.AlibiAttention(form=form))
    a = _only(found)
    assert a["causal"] is causal and a["window"] is None and err < 1e-12
    assert torch.allclose(a["slopes"].double(), M.alibi_slopes(4).double(), rtol=1e-6)
    assert a["slopes"].dtype == torch.float32


def test_a_relative_bias_that_is_not_alibi_is_left_alone():
    found, err = _canonicalized(M.AdditiveBiasAttention())
    assert found == [] and err < 1e-12


def test_gemma2_soft_capping_is_carried_as_softcap():
    found, err = _canonicalized(M.SoftcapAttention(cap=0.5))
    a = _only(found)
    assert a["causal"] is True and a["softcap"] == 0.5 and err < 1e-12
    assert a["k"].meta["example_value"].shape[1] == 2           # GQA repeat_kv folded


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("is_causal", [True, False])
def test_multihead_attention_is_decomposed_around_a_causal_canonical_node(batch_first, is_causal):
    found, err = _canonicalized(M.MHAAttention(batch_first=batch_first, is_causal=is_causal))
    a = _only(found)
    assert a["causal"] is True and a["scale"] == pytest.approx(8 ** -0.5) and err < 1e-12


def test_transformer_encoder_layer_with_causal_mask_is_canonicalized():
    found, err = _canonicalized(M.EncoderLayerAttention())
    assert _only(found)["causal"] is True and err < 1e-12


def test_sdpa_window_mask_with_repeat_interleaved_kv_is_a_window_over_small_kv():
    found, err = _canonicalized(M.SDPAWindowGQA(window=5))
    a = _only(found)
    assert (a["causal"], a["window"]) == (True, 5) and err < 1e-12
    assert a["k"].meta["example_value"].shape[1] == 2 and a["v"].meta["example_value"].shape[1] == 2


def test_sdpa_causal_lower_right_is_plain_causal_sdpa():
    """Dynamo turns ``causal_lower_right`` of equal lengths into ``is_causal=True`` itself."""
    torch.manual_seed(0)
    module = M.SDPALowerRight(32, 4, seq=S).double()
    graphs = []
    torch._dynamo.reset()
    x = torch.randn(2, S, 32, dtype=torch.float64)
    out = torch.compile(module, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(x)
    sdpa = [n for n in graphs[0].graph.nodes if "scaled_dot_product" in str(n.target)]
    assert len(graphs) == 1 and len(sdpa) == 1 and sdpa[0].kwargs.get("is_causal") is True
    assert torch.allclose(out, module(x))


def test_value_head_dim_may_differ_from_query_head_dim():
    found, err = _canonicalized(M.ValueDimAttention(v_dim=12))
    a = _only(found)
    assert a["v"].meta["example_value"].shape[-1] == 12 and a["causal"] is True and err < 1e-12


def test_canonical_attention_means_softcapped_alibi_masked_softmax_attention():
    torch.manual_seed(0)
    q = torch.randn(2, 4, S, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, S, 8, dtype=torch.float64), torch.randn(2, 2, S, 6, dtype=torch.float64)
    slopes = M.alibi_slopes(4)
    i = torch.arange(S)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    s = 2.0 * torch.tanh(s / 2.0) + slopes.double()[:, None, None] * (i[None, :] - i[:, None])
    vis = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 5)
    ref = torch.softmax(s.masked_fill(~vis, float("-inf")), -1) @ v.repeat_interleave(2, 1)
    out = canonical_attention(q, k, v, True, 5, None, 0.3, slopes, 2.0)
    assert out.shape == (2, 4, S, 6) and torch.allclose(out, ref)


def test_alibi_fit_accepts_per_row_constants_and_refuses_anything_else():
    i = torch.arange(S)
    vis = (i[:, None] >= i[None, :]).expand(1, 2, S, S)
    slopes = torch.tensor([0.5, 0.125])
    signed = slopes[:, None, None] * (i[None, :] - i[:, None])
    key_only = (slopes[:, None, None] * i[None, None, :]).expand(2, S, S)
    assert torch.allclose(fit_alibi(signed[None], vis), slopes)
    assert torch.allclose(fit_alibi(key_only[None], vis), slopes)
    noisy = signed.clone()
    noisy[1, 9, 3] += 1e-3
    assert fit_alibi(noisy[None], vis) is None
    assert fit_alibi((signed.abs())[None].expand(1, 2, S, S), (i[:, None] >= 0).expand(1, 2, S, S)) is None


def _flex_canonicalized(module):
    """flex_attention has no CPU backward in eager: compared forward-only, under no_grad."""
    torch.manual_seed(0)
    found = []

    def capture(gm, ex):
        static = {n for n in gm.graph.nodes if n.op == "placeholder" and "_parameters_" in str(n.target)}
        canonicalize_handwritten_attention(gm, ex, static)
        found.extend(list(n.args) for n in gm.graph.nodes if n.target is canonical_attention)
        assert not [n for n in gm.graph.nodes if "batch_dim" in getattr(n.target, "__name__", "")]
        return gm.forward
    x = torch.randn(2, S, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, backend=capture)(x)
        ref = module(x)
    return found, float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("window", [None, 4])
def test_flex_attention_mask_mod_is_proved_on_global_indices(window):
    """The block mask built in forward is dead afterwards and removed, vmap bookkeeping too."""
    found, err = _flex_canonicalized(M.FlexAttention(window=window))
    a = _only(found)
    assert (a["causal"], a["window"]) == (True, window) and err < 1e-6
