"""Attention written the ways real codebases write it → one canonical attention node whose
single-device meaning equals the module (float64), with masks and ALiBi slopes proved by
evaluation and everything unprovable left alone (issue 12)."""
import sys
from pathlib import Path

import pytest
import torch

from seqpar_compiler.kernels import AttentionSpec
from seqpar_compiler.passes.attention_patterns import canonical_attention, canonicalize_handwritten_attention
from seqpar_compiler.passes.score_bias import fit_alibi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import alibi_modules as AL  # noqa: E402
import attention_modules as M  # noqa: E402
import mha_modules as MH  # noqa: E402

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
    """The one canonical node's arguments by name, its spec's fields among them."""
    assert len(found) == 1, f"{len(found)} canonical attention nodes"
    args = dict(zip(["q", "k", "v", "spec", "doc", "key_padding", "slopes"], found[0] + [None] * (7 - len(found[0]))))
    spec = AttentionSpec.decode(args["spec"])
    assert spec.alibi == (args["slopes"] is not None) and spec.docs == (args["doc"] is not None)
    return {**args, "causal": spec.causal, "window": spec.window, "scale": spec.scale, "softcap": spec.softcap,
            "band": (spec.behind, spec.ahead)}


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


def test_a_fixed_relative_bias_that_is_not_alibi_is_a_table_of_the_offset():
    """``table[h, |i − j|]`` from buffers: no slope fits, a per-head function of j − i does (the
    ring evaluates it per block from a [H, 2S − 1] table)."""
    found, err = _canonicalized(M.AdditiveBiasAttention())
    assert len(found) == 1 and err < 1e-12
    spec = AttentionSpec.decode(found[0][3])
    assert spec.causal and spec.rel_bias and not spec.alibi and found[0][7].shape == (4, 2 * S - 1)


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
    spec = AttentionSpec.of(causal=True, window=5, scale=0.3, alibi=True, softcap=2.0)
    out = canonical_attention(q, k, v, spec.encode(), None, None, slopes)
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


# -- flex_attention: documents mask_mod, soft-cap / ALiBi score_mod ------------------------------
import flex_modules as FX  # noqa: E402

_DOC = torch.tensor([[0] * 5 + [1] * 8 + [2] * 3, [0] * 11 + [1] * 5])


def _flex_doc_canonicalized(module, doc=_DOC):
    """(canonical args, rel. error) of a ``FlexDocAttention`` (flex traced) vs its eager SDPA
    reference with an explicit mask, forward only under no_grad (no CPU flex backward)."""
    torch.manual_seed(0)
    found = []

    def capture(gm, ex):
        static = {n for n in gm.graph.nodes if n.op == "placeholder"
                  and ("_parameters_" in str(n.target) or "_buffers_" in str(n.target))}
        canonicalize_handwritten_attention(gm, ex, static)
        found.extend([a if not isinstance(a, torch.fx.Node) or a.op != "get_attr" else getattr(gm, a.target)
                      for a in n.args] for n in gm.graph.nodes if n.target is canonical_attention)
        assert not [n for n in gm.graph.nodes if "flex_attention" in str(n.target)] or not found
        return gm.forward
    x = torch.randn(2, S, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, backend=capture)(x, doc)
        ref = module(x, doc)
    return found, float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 4)])
def test_flex_documents_mask_mod_becomes_doc_ids_of_the_user_tensor(causal, window):
    found, err = _flex_doc_canonicalized(FX.FlexDocAttention(causal=causal, window=window))
    a = _only(found)
    assert (a["causal"], a["window"]) == (causal, window) and err < 1e-6
    assert a["doc"] is not None and a["doc"].op == "placeholder"          # the user's doc tensor itself


def test_flex_documents_computed_from_position_ids_are_the_computed_node():
    pos = torch.cat([torch.arange(5), torch.arange(8), torch.arange(3)]).expand(2, S)
    found, err = _flex_doc_canonicalized(FX.FlexDocAttention(docs="computed"), pos)
    a = _only(found)
    assert a["causal"] is True and a["doc"].op == "call_function" and err < 1e-6


@pytest.mark.parametrize("docs", [None, "input"])
def test_flex_score_mods_soft_cap_and_alibi_are_carried(docs):
    found, err = _flex_doc_canonicalized(FX.FlexDocAttention(docs=docs, score="softcap", cap=0.5))
    a = _only(found)
    assert a["softcap"] == 0.5 and a["slopes"] is None and err < 1e-6
    found, err = _flex_doc_canonicalized(FX.FlexDocAttention(docs=docs, score="alibi"))
    a = _only(found)
    assert a["softcap"] is None and err < 1e-6
    assert torch.allclose(a["slopes"].double(), M.alibi_slopes(4).double(), rtol=1e-6)


class _FlexMods(M._QKV):
    """flex_attention with the given mods (closures may read ``doc`` [B, S], a user input)."""

    def __init__(self, mask_mod, score_mod=None):
        super().__init__(32, 4)
        self.mask_mod, self.score_mod = mask_mod, score_mod

    def forward(self, x, doc):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        q, k, v = self.heads(x)
        s = q.shape[-2]
        mask_mod = self.mask_mod(doc)
        block_mask = create_block_mask(mask_mod, q.shape[0], None, s, s, device="cpu")
        score_mod = None if self.score_mod is None else self.score_mod(doc)
        return self.out(flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask))


def _flex_left_alone(module):
    found = []

    def capture(gm, ex):
        static = {n for n in gm.graph.nodes if n.op == "placeholder" and "_parameters_" in str(n.target)}
        canonicalize_handwritten_attention(gm, ex, static)
        found.extend(n for n in gm.graph.nodes if n.target is canonical_attention)
        assert [n for n in gm.graph.nodes if "flex_attention" in str(n.target)]
        return gm.forward
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend=capture)(torch.randn(2, S, 32), _DOC)
    return found


@pytest.mark.parametrize("what,mask_mod,score_mod", [
    ("padding from a user tensor", lambda d: lambda b, h, q, kv: (d[b, kv] < 2) & (q >= kv), None),
    ("documents negated", lambda d: lambda b, h, q, kv: ~(d[b, q] == d[b, kv]), None),
    ("documents across batch rows", lambda d: lambda b, h, q, kv: d[0, q] == d[b, kv], None),
    ("a prefix-LM mask", lambda d: lambda b, h, q, kv: (q >= kv) | (kv < 4), None),
    ("a scaled score", lambda d: lambda b, h, q, kv: q >= kv, lambda d: lambda s, b, h, q, kv: s * 2.0),
    ("a bias read from user data", lambda d: lambda b, h, q, kv: q >= kv,
     lambda d: lambda s, b, h, q, kv: s + d[b, kv] * 0.1),
    ("a score used as a mask", lambda d: lambda b, h, q, kv: q >= kv,
     lambda d: lambda s, b, h, q, kv: torch.where(q - kv < 3, s, -float("inf"))),
])
def test_flex_mods_that_are_not_the_rings_semantics_are_left_alone(what, mask_mod, score_mod):
    assert _flex_left_alone(_FlexMods(mask_mod, score_mod)) == [], what


def test_flex_relative_bias_of_the_offset_is_a_table():
    """A score_mod adding ``0.1 · |q − kv|`` (no signed slope fits) is a per-head function of the
    offset: carried as the [H, 2S − 1] table, whose visible (causal: kv ≤ q) entries are the bias."""
    found = []

    def capture(gm, ex):
        static = {n for n in gm.graph.nodes if n.op == "placeholder" and "_parameters_" in str(n.target)}
        canonicalize_handwritten_attention(gm, ex, static)
        found.extend([a if not isinstance(a, torch.fx.Node) or a.op != "get_attr" else getattr(gm, a.target)
                      for a in n.args] for n in gm.graph.nodes if n.target is canonical_attention)
        return gm.forward
    torch._dynamo.reset()
    module = _FlexMods(lambda d: lambda b, h, q, kv: q >= kv, lambda d: lambda s, b, h, q, kv: s + (q - kv).abs() * 0.1)
    with torch.no_grad():
        torch.compile(module, backend=capture)(torch.randn(2, S, 32), _DOC)
    assert len(found) == 1
    spec, table = AttentionSpec.decode(found[0][3]), found[0][7]
    assert spec.causal and spec.rel_bias and not spec.alibi
    behind = torch.arange(S - 1, -1, -1, dtype=torch.float32) * 0.1           # offsets −(S−1) .. 0
    assert table.shape == (4, 2 * S - 1) and torch.allclose(table[:, :S], behind.expand(4, S), atol=1e-6)


def test_cpu_flex_attention_with_grad_cannot_be_captured_by_dynamo(monkeypatch):
    """What does not run on CPU (documented in flex_modules.py): torch's CPU backward check
    raises while Dynamo traces, so the frame is never handed to any backend; if torch lifts
    it, this test tells us to drop ``allow_cpu_flex_capture``."""
    import torch.nn.attention.flex_attention as flex
    from torch.nn.attention.flex_attention import flex_attention
    monkeypatch.setattr(flex, "_validate_device", getattr(flex._validate_device, "_original", flex._validate_device))
    q = torch.randn(1, 2, S, 8, requires_grad=True)
    graphs = []
    torch._dynamo.reset()
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        torch.compile(lambda t: flex_attention(t, t, t), backend=lambda gm, ex: graphs.append(gm) or gm.forward)(q)
    assert graphs == []


def test_alibi_added_before_the_scale_becomes_slopes_times_the_scale():
    """``(q kᵀ + slope·(j − i)) · s`` with a -inf causal fill after the scale."""
    found, err = _canonicalized(AL.AlibiBeforeScale())
    a = _only(found)
    assert a["causal"] is True and a["scale"] == pytest.approx(8 ** -0.5) and err < 1e-8   # fp32 slopes
    assert torch.allclose(a["slopes"].double(), M.alibi_slopes(4).double() * 8 ** -0.5, rtol=1e-6)


@pytest.mark.parametrize("keywords,beta", [(True, 0.5), (False, 2.0)])
def test_bloom_baddbmm_alibi_with_beta_and_alpha_becomes_slopes_times_beta(keywords, beta):
    """Bloom's ``alibi.baddbmm(batch1=q, batch2=kᵀ, beta=β, alpha=1/√d)`` (keywords, which used
    to crash the match) and ``torch.baddbmm(alibi, q, kᵀ, beta=β, alpha=α)``: alpha is the
    scale of q kᵀ only, beta scales the bias."""
    found, err = _canonicalized(AL.BaddbmmAlibi(beta=beta, keywords=keywords))
    a = _only(found)
    assert a["causal"] is True and a["scale"] == pytest.approx(8 ** -0.5) and err < 1e-6   # fp32 softmax
    assert torch.allclose(a["slopes"].double(), M.alibi_slopes(4).double() * beta, rtol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_with_default_need_weights_shards_when_the_weights_are_dropped(batch_first):
    """``need_weights=True`` is the default; Dynamo keeps only output 0 when ``w`` is unused."""
    found, err = _canonicalized(MH.MHADefault(batch_first=batch_first))
    assert _only(found)["causal"] is True and err < 1e-12


@pytest.mark.parametrize("kw", [dict(read_weights=True), dict(key_padding=True)])
def test_multihead_attention_with_read_weights_or_key_padding_is_left_whole(kw):
    found, err = _canonicalized(MH.MHADefault(**kw))
    assert found == [] and err < 1e-12
