"""Block kernels (aten, math) against a float64 reference, for every mask kind the ring uses."""
import dataclasses

import pytest
import torch

from reference import reference_attention, rel_err
from seqpar_compiler.kernels import (BlockKind, BlockMask, block_attention_backward,
                                     block_attention_forward, classify_block)

KERNELS = ["aten", "math"]

# (name, M, N, mask kwargs) — positions are global, so offsets/strides model ring blocks.
CASES = [
    ("full", 24, 40, dict()),
    ("causal_diag", 32, 32, dict(causal=True)),
    ("causal_past_block", 16, 16, dict(causal=True, q_start=64, k_start=16)),
    ("causal_offset_partial", 20, 28, dict(causal=True, q_start=10, k_start=3)),
    ("striped_later_keys", 24, 24, dict(causal=True, q_start=1, q_stride=4, k_start=2, k_stride=4)),
    ("striped_earlier_keys", 24, 24, dict(causal=True, q_start=2, q_stride=4, k_start=1, k_stride=4)),
    ("window", 300, 300, dict(causal=True, window=37)),
    ("window_offset", 40, 40, dict(causal=True, window=13, q_start=40, k_start=20)),
]


def _positions(start, stride, n):
    return start + torch.arange(n) * stride


def alibi_slopes(H):
    """The ALiBi paper's geometric slopes 2^(-8h/H), h = 1..H."""
    return torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float32)


def _run_case(kernel, M, N, kw, *, Hq=4, Hkv=2, D=80, Dv=None, dtype=torch.float32, docs=None, alibi=False,
              softcap=None, k_valid=None, band=None, table=False):
    torch.manual_seed(0)
    B = 2
    q = torch.randn(B, Hq, M, D, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, dtype=dtype)
    v = torch.randn(B, Hkv, N, D if Dv is None else Dv, dtype=dtype)
    q_doc = k_doc = None
    if docs is not None:
        q_doc, k_doc = docs
    slopes = alibi_slopes(Hq) if alibi else None
    mask = BlockMask.of(q_doc=q_doc, k_doc=k_doc, alibi_slopes=slopes, softcap=softcap, k_valid=k_valid, **kw)
    if band is not None:                                      # a bidirectional band (behind, ahead)
        mask = dataclasses.replace(mask, spec=mask.spec.with_(behind=band[0], ahead=band[1]))
    rel = None
    if table:                                                 # a table over offsets of a length-128 sequence
        rel = torch.randn(Hq, 2 * 128 - 1, generator=torch.Generator().manual_seed(3))
        mask = dataclasses.replace(mask, spec=mask.spec.with_(rel_bias=True), rel_bias=rel)
    scale = 0.3
    out, lse = block_attention_forward(q, k, v, mask, scale, kernel)
    qp = _positions(kw.get("q_start", 0), kw.get("q_stride", 1), M)
    kp = _positions(kw.get("k_start", 0), kw.get("k_stride", 1), N)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, scale=scale, causal=kw.get("causal", False),
                                           window=kw.get("window"), doc_ids=q_doc, k_doc=k_doc,
                                           q_pos=qp, k_pos=kp, alibi_slopes=slopes, softcap=softcap,
                                           k_valid=k_valid, behind=None if band is None else band[0],
                                           ahead=None if band is None else band[1], rel_bias=rel)
    dout = torch.randn_like(ref_out)
    ref_out.backward(dout)
    dq, dk, dv = block_attention_backward(dout.to(dtype), q, k, v, out, lse, mask, scale, kernel)
    return (out, lse, dq, dk, dv), (ref_out.detach(), ref_lse, q64.grad, k64.grad, v64.grad)


def _assert_matches(got, ref, tol=1e-5):
    out, lse, dq, dk, dv = got
    r_out, r_lse, r_dq, r_dk, r_dv = ref
    assert torch.equal(torch.isneginf(lse), torch.isneginf(r_lse)), "dead rows must have lse = -inf"
    finite = ~torch.isneginf(r_lse)
    assert torch.allclose(lse[finite].double(), r_lse[finite], atol=1e-5)
    for name_, x, r in [("out", out, r_out), ("dq", dq, r_dq), ("dk", dk, r_dk), ("dv", dv, r_dv)]:
        assert x.shape == r.shape, (name_, x.shape, r.shape)
        assert not torch.isnan(x).any(), f"{name_} has NaN"
        assert rel_err(x, r) < tol, f"{name_} rel err {rel_err(x, r):.2e}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name,M,N,kw", CASES, ids=[c[0] for c in CASES])
def test_block_kernel_matches_float64_reference(kernel, name, M, N, kw):
    _assert_matches(*_run_case(kernel, M, N, kw))


# Score semantics of issue 12 on ring-like blocks: ALiBi over global positions (the bias of a
# past block is far from zero), soft-capping, a value head dim other than the query's, alone
# and with every mask kind.
SEMANTICS = {
    "alibi": dict(alibi=True),
    "softcap": dict(softcap=2.5),
    "dv48": dict(Dv=48),
    "dv112": dict(Dv=112),
    "alibi+softcap+dv48": dict(alibi=True, softcap=2.5, Dv=48),
}
SEM_CASES = ["full", "causal_diag", "causal_past_block", "striped_later_keys", "window_offset", "window"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("sem", sorted(SEMANTICS))
@pytest.mark.parametrize("case", SEM_CASES)
def test_alibi_softcap_and_value_head_dim_match_float64_reference(kernel, sem, case):
    _, M, N, kw = next(c for c in CASES if c[0] == case)
    _assert_matches(*_run_case(kernel, M, N, kw, **SEMANTICS[sem]))


@pytest.mark.parametrize("kernel", KERNELS)
def test_alibi_with_documents_and_dead_rows(kernel):
    """ALiBi + causal + documents, rows 0..3 of batch 0 see no key: out = 0, lse = -inf, no NaN."""
    q_doc = torch.tensor([[7] * 4 + [1] * 6 + [2] * 6, [1] * 16])
    k_doc = torch.tensor([[1] * 8 + [2] * 8, [1] * 4 + [3] * 12])
    got, ref = _run_case(kernel, 16, 16, dict(causal=True, q_start=40, k_start=30), docs=(q_doc, k_doc),
                         alibi=True, softcap=3.0, Dv=24)
    assert torch.isneginf(got[1][0, :, :4]).all() and (got[0][0, :, :4] == 0).all()
    _assert_matches(got, ref)


def test_aten_alibi_bias_is_built_per_query_tile(monkeypatch):
    """A 600-row ALiBi block never materialises more than TILE_ROWS × N of bias."""
    import seqpar_compiler.kernels.aten_cpu as aten_cpu
    seen = []
    real = aten_cpu._additive_mask

    def spy(mask, tile, dtype):
        add, alive = real(mask, tile, dtype)
        seen.append(tuple(add.shape))
        return add, alive
    monkeypatch.setattr(aten_cpu, "_additive_mask", spy)
    got, ref = _run_case("aten", 600, 40, dict(), Hq=2, Hkv=1, D=16, alibi=True)
    _assert_matches(got, ref)
    assert seen and max(s[-2] for s in seen) <= aten_cpu.TILE_ROWS, seen


@pytest.mark.parametrize("kernel", KERNELS)
def test_alibi_in_bf16_stays_close_to_reference(kernel):
    got, ref = _run_case(kernel, 64, 64, dict(causal=True, q_start=512, k_start=448), Hq=2, Hkv=2, D=64,
                         dtype=torch.bfloat16, alibi=True)
    for x, r in zip(got, ref):
        assert rel_err(x.float(), r) < 2e-2


@pytest.mark.parametrize("kernel", KERNELS)
def test_documents_and_fully_masked_rows_give_zero_and_neg_inf(kernel):
    """Row 0..3 of q are in document 7, which no key has: out = 0, lse = -inf, no NaN."""
    M = N = 16
    q_doc = torch.tensor([[7] * 4 + [1] * 6 + [2] * 6, [1] * 16])
    k_doc = torch.tensor([[1] * 8 + [2] * 8, [1] * 4 + [3] * 12])
    got, ref = _run_case(kernel, M, N, dict(causal=True), docs=(q_doc, k_doc))
    out, lse = got[0], got[1]
    assert torch.isneginf(lse[0, :, :4]).all()
    assert (out[0, :, :4] == 0).all()
    for x, r in zip(got, ref):
        if x is lse:
            continue
        assert not torch.isnan(x).any()
        assert rel_err(x, r) < 1e-5


def test_classify_block_from_global_indices():
    c = BlockMask.of(causal=True, q_start=0, k_start=16)
    assert classify_block(c, 16, 16) is BlockKind.EMPTY
    assert classify_block(BlockMask.of(causal=True, q_start=32, k_start=0), 16, 16) is BlockKind.FULL
    assert classify_block(BlockMask.of(causal=True), 16, 16) is BlockKind.PARTIAL
    # a window of 8 never reaches 24 positions back
    assert classify_block(BlockMask.of(causal=True, window=8, q_start=32, k_start=0), 16, 16) is BlockKind.EMPTY
    docs = BlockMask.of(q_doc=torch.tensor([[1, 1]]), k_doc=torch.tensor([[2, 2]]))
    assert classify_block(docs, 2, 2) is BlockKind.EMPTY


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_block_close_to_reference(kernel, dtype):
    got, ref = _run_case(kernel, 64, 64, dict(causal=True), Hq=2, Hkv=2, D=64, dtype=dtype)
    assert got[1].dtype == torch.float32, "lse must be fp32 for low-precision inputs"
    for x, r in zip(got, ref):
        assert rel_err(x.float(), r) < 2e-2


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("D", [256, 96, 40])
def test_head_dims_up_to_256_including_non_powers_of_two(kernel, D):
    got, ref = _run_case(kernel, 20, 20, dict(causal=True, q_start=4), Hq=2, Hkv=1, D=D)
    for x, r in zip(got, ref):
        if x.dim() == 3:
            continue
        assert rel_err(x, r) < 1e-5


# Key padding (a per-key validity, travelling with its K/V block) and bidirectional bands
# (ModernBERT's local window |q - k| <= r) on ring-like blocks, alone and with every other kind.
PADDING = torch.tensor([[True] * 30 + [False] * 10, [False] * 3 + [True] * 37])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["full", "causal_offset_partial", "window_offset", "striped_later_keys"])
@pytest.mark.parametrize("sem", ["plain", "alibi+softcap+dv48"])
def test_key_padding_matches_float64_reference(kernel, case, sem):
    _, M, N, kw = next(c for c in CASES if c[0] == case)
    extra = {} if sem == "plain" else SEMANTICS[sem]
    _assert_matches(*_run_case(kernel, M, N, kw, k_valid=PADDING[:, :N], **extra))


@pytest.mark.parametrize("kernel", KERNELS)
def test_key_padding_that_hides_every_key_of_a_row_gives_zero_and_neg_inf(kernel):
    """Left padding under a causal mask: batch 1's first queries see only padded keys."""
    k_valid = torch.tensor([[True] * 24, [False] * 6 + [True] * 18])
    got, ref = _run_case(kernel, 24, 24, dict(causal=True), k_valid=k_valid, docs=None)
    assert torch.isneginf(got[1][1, :, :6]).all() and (got[0][1, :, :6] == 0).all()
    assert not torch.isneginf(got[1][0]).any()
    _assert_matches(got, ref)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("band,q_start,k_start", [((4, 4), 0, 0), ((4, 4), 20, 0), ((0, 3), 10, 12),
                                                   ((None, 2), 0, 16), ((6, None), 30, 0)])
def test_bidirectional_bands_match_float64_reference(kernel, band, q_start, k_start):
    _assert_matches(*_run_case(kernel, 24, 24, dict(q_start=q_start, k_start=k_start), band=band))


def test_key_padding_classifies_blocks_empty_partial_or_plain():
    none = BlockMask.of(causal=True, k_valid=torch.zeros(2, 16, dtype=torch.bool))
    assert classify_block(none, 16, 16) is BlockKind.EMPTY
    some = BlockMask.of(k_valid=PADDING[:, :16])
    assert classify_block(some, 16, 16) is BlockKind.PARTIAL
    assert classify_block(BlockMask.of(k_valid=torch.ones(2, 16, dtype=torch.bool)), 16, 16) is BlockKind.FULL


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["full", "causal_past_block", "striped_later_keys", "window_offset"])
def test_relative_position_table_matches_float64_reference(kernel, case):
    """Any per-head function of the offset (a symmetric ALiBi, a T5-style table), evaluated per
    tile from the rows' global positions, with padding, soft-capping and Dv ≠ D."""
    _, M, N, kw = next(c for c in CASES if c[0] == case)
    _assert_matches(*_run_case(kernel, M, N, kw, table=True, k_valid=PADDING[:, :N], softcap=2.5, Dv=48))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["full", "causal_past_block", "striped_later_keys", "window_offset"])
def test_learned_relative_position_table_gradient_matches_float64_reference(kernel, case):
    """A learned table's gradient (T5's bias): every kernel choice hands the block to the math
    kernel, which adds the score gradient of each pair into the table entry of its offset; with
    padding and soft-capping (the bias comes after the cap)."""
    _, M, N, kw = next(c for c in CASES if c[0] == case)
    torch.manual_seed(0)
    B, Hq, Hkv, D, L = 2, 4, 2, 32, 128
    q, k, v = torch.randn(B, Hq, M, D), torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)
    table = torch.randn(Hq, 2 * L - 1, generator=torch.Generator().manual_seed(3))
    mask = BlockMask.of(softcap=2.5, k_valid=PADDING[:, :N], **kw)
    mask = dataclasses.replace(mask, spec=mask.spec.with_(rel_bias=True), rel_bias=table)
    out, lse = block_attention_forward(q, k, v, mask, 0.3, kernel)
    q64, k64, v64, t64 = (t.double().requires_grad_() for t in (q, k, v, table))
    ref_out, _ = reference_attention(q64, k64, v64, scale=0.3, causal=kw.get("causal", False), window=kw.get("window"),
                                     q_pos=_positions(kw.get("q_start", 0), kw.get("q_stride", 1), M),
                                     k_pos=_positions(kw.get("k_start", 0), kw.get("k_stride", 1), N),
                                     softcap=2.5, k_valid=PADDING[:, :N], rel_bias=t64)
    dout = torch.randn_like(ref_out)
    ref_out.backward(dout)
    grad = torch.zeros(Hq, 2 * L - 1)
    dq, dk, dv = block_attention_backward(dout.float(), q, k, v, out, lse,
                                          dataclasses.replace(mask, rel_bias_grad=grad), 0.3, kernel)
    assert t64.grad.abs().sum() > 0
    for name_, x, r in [("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad), ("dtable", grad, t64.grad)]:
        assert rel_err(x, r) < 1e-5, f"{name_} rel err {rel_err(x, r):.2e}"
