"""Per-block CUDA dispatch (issue 14), on CPU with the CUDA kernels stubbed.

The ATen cuDNN and FA2 calls are replaced by float64 math models of *their* semantics (cuDNN:
top-left causal; FA2: bottom-right causal, window_size_left/right, varlen ``cum_seq`` pairs,
lse = +inf for a row that sees no key). A block plan that asked them for the wrong mask would
then give a wrong answer against the float64 reference of the *block's* mask, so these tests
check the plans, the layouts and the lse fix-ups, and which kernel each block kind goes to,
forward and backward alike (``stats().kernel_calls``).
"""
import pytest
import torch

from reference import reference_attention, rel_err
from seqpar_compiler.kernels import AUTO_CUDA, BlockMask, block_attention_backward, block_attention_forward
from seqpar_compiler.kernels import cuda_aten, cuda_dispatch
from seqpar_compiler.runtime import stats

SCALE = 0.3


# ----------------------------------------------------------------------------- kernel models


def _expand_heads(k, Hq):
    return k.repeat_interleave(Hq // k.shape[-3], dim=-3)


def _model_fwd(q, k, v, vis, scale):
    """q [H, M, D], k/v [H, N, D] (heads already matched), vis [M, N] → out [H,M,D], lse [H,M] (+inf dead)."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    return p @ v.double(), lse.masked_fill(torch.isneginf(lse), float("inf"))


def _model_bwd(dout, q, k, v, out, lse, vis, scale):
    q, k, v, dout, out, lse = (t.double() for t in (q, k, v, dout, out, lse))
    s = (q @ k.transpose(-1, -2)) * scale
    p = torch.exp(s - lse[..., None]).masked_fill(~vis, 0.0)
    dv = p.transpose(-1, -2) @ dout
    ds = p * (dout @ v.transpose(-1, -2) - (dout * out).sum(-1, keepdim=True))
    return ds @ k * scale, ds.transpose(-1, -2) @ q * scale, dv


def _fa_vis(M, N, causal, left, right):
    i, j = torch.arange(M)[:, None], torch.arange(N)[None, :]
    c = N - M
    vis = torch.ones(M, N, dtype=torch.bool)
    if causal:
        vis &= j <= i + c
    if left is not None and left >= 0:
        vis &= j >= i + c - left
    if right is not None and right >= 0:
        vis &= j <= i + c + right
    return vis


def _cudnn_forward(q, k, v, causal, scale):
    M, N = q.shape[2], k.shape[2]
    assert q.shape[1] == k.shape[1], "the cuDNN path is only taken without GQA"
    assert not causal or M == N, "cuDNN's causal is top-left: only square blocks are planned for it"
    vis = torch.ones(M, N, dtype=torch.bool).tril() if causal else torch.ones(M, N, dtype=torch.bool)
    out, lse = _model_fwd(q, k, v, vis, scale)
    return out.to(q.dtype), lse.float()


def _cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    M, N = q.shape[2], k.shape[2]
    vis = torch.ones(M, N, dtype=torch.bool).tril() if causal else torch.ones(M, N, dtype=torch.bool)
    return tuple(g.to(q.dtype) for g in _model_bwd(dout, q, k, v, out, lse, vis, scale))


def _segments(cu_q, cu_k, B, M, N):
    if cu_q is None:
        return [(b * M, (b + 1) * M, b * N, (b + 1) * N) for b in range(B)]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]


def _flat(x):   # [B, S, H, D] → [B·S, H, D]; varlen inputs are flat already
    return x.reshape(-1, *x.shape[-2:]) if x.dim() == 4 else x


def _flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, left, right):
    varlen = cu_q is not None
    B, M, N = (1, q.shape[0], k.shape[0]) if varlen else (q.shape[0], q.shape[1], k.shape[1])
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    Hq = qf.shape[1]
    out = torch.zeros(qf.shape, dtype=torch.float64)
    lse = torch.full((Hq, qf.shape[0]), float("inf"), dtype=torch.float64)
    for q0, q1, k0, k1 in _segments(cu_q, cu_k, B, M, N):
        if q1 == q0 or k1 == k0:
            continue
        qs = qf[q0:q1].transpose(0, 1)
        ks, vs = (_expand_heads(t[k0:k1].transpose(0, 1), Hq) for t in (kf, vf))
        o, l = _model_fwd(qs, ks, vs, _fa_vis(q1 - q0, k1 - k0, causal, left, right), scale)
        out[q0:q1], lse[:, q0:q1] = o.transpose(0, 1), l
    out = out.to(q.dtype)
    if varlen:
        return out, lse.float()
    return out.reshape(q.shape), lse.reshape(Hq, B, M).permute(1, 0, 2).float().contiguous()


def _flash_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, left, right):
    varlen = cu_q is not None
    B, M, N = (1, q.shape[0], k.shape[0]) if varlen else (q.shape[0], q.shape[1], k.shape[1])
    qf, kf, vf, df, of = (_flat(t) for t in (q, k, v, dout, out))
    Hq, Hkv = qf.shape[1], kf.shape[1]
    lse_f = lse if varlen else lse.permute(1, 0, 2).reshape(Hq, B * M)
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float64) for t in (qf, kf, vf))
    for q0, q1, k0, k1 in _segments(cu_q, cu_k, B, M, N):
        if q1 == q0 or k1 == k0:
            continue
        tq = lambda t: t[q0:q1].transpose(0, 1)                                 # noqa: E731
        ks, vs = (_expand_heads(t[k0:k1].transpose(0, 1), Hq) for t in (kf, vf))
        g = _model_bwd(tq(df), tq(qf), ks, vs, tq(of), lse_f[:, q0:q1], _fa_vis(q1 - q0, k1 - k0, causal, left, right),
                       scale)
        dq[q0:q1] += g[0].transpose(0, 1)
        for acc, gk in ((dk, g[1]), (dv, g[2])):                               # sum the GQA groups
            acc[k0:k1] += gk.reshape(Hkv, Hq // Hkv, k1 - k0, -1).sum(1).transpose(0, 1)
    return tuple(t.reshape(s.shape).to(q.dtype) for t, s in ((dq, q), (dk, k), (dv, v)))


@pytest.fixture
def cuda_kernels_stubbed(monkeypatch):
    monkeypatch.setattr(cuda_aten, "_cudnn_forward", _cudnn_forward)
    monkeypatch.setattr(cuda_aten, "_cudnn_backward", _cudnn_backward)
    monkeypatch.setattr(cuda_aten, "_flash_forward", _flash_forward)
    monkeypatch.setattr(cuda_aten, "_flash_backward", _flash_backward)
    monkeypatch.setattr(cuda_dispatch, "cuda_aten_kernels", lambda device: (True, True))


# ----------------------------------------------------------------------------- cases


def _pos(start, stride, n):
    return start + torch.arange(n) * stride


# (name, M, N, mask kwargs, doc lengths, Hq, Hkv, expected kernel)
CASES = [
    ("full", 24, 40, dict(), None, 2, 2, "cudnn"),
    ("causal_diagonal", 32, 32, dict(causal=True), None, 2, 2, "cudnn"),
    ("causal_past_block", 16, 24, dict(causal=True, q_start=64, k_start=8), None, 2, 2, "cudnn"),
    ("causal_gqa", 32, 32, dict(causal=True), None, 4, 2, "flash"),
    ("striped_later_keys", 24, 24, dict(causal=True, q_start=1, q_stride=4, k_start=2, k_stride=4), None, 2, 2,
     "cudnn"),
    ("striped_earlier_keys", 24, 24, dict(causal=True, q_start=2, q_stride=4, k_start=1, k_stride=4), None, 2, 2,
     "cudnn"),
    ("window_diagonal", 40, 40, dict(causal=True, window=7), None, 2, 1, "flash"),
    ("window_offset", 40, 40, dict(causal=True, window=13, q_start=40, k_start=20), None, 2, 2, "flash"),
    ("window_wider_than_block", 24, 24, dict(causal=True, window=100, q_start=24), None, 2, 2, "cudnn"),
    ("docs", 33, 33, dict(), (10,), 2, 1, "flash"),
    ("docs_causal_diagonal", 40, 40, dict(causal=True), (10, 7), 2, 2, "flash"),
    ("docs_causal_past_block", 20, 20, dict(causal=True, q_start=20), (8, 6), 2, 2, "flash"),
    ("striped_window", 24, 24, dict(causal=True, window=30, q_start=3, q_stride=4, k_start=1, k_stride=4), None,
     2, 2, "triton"),
    ("docs_and_window", 30, 40, dict(causal=True, window=9, q_start=10), (12, 5), 2, 2, "triton"),
    ("docs_causal_offset", 20, 20, dict(causal=True, q_start=10), (8,), 2, 2, "triton"),
]


def _block(M, N, kw, doc_lens, Hq, Hkv, *, B=2, D=16, dtype=torch.float16):
    torch.manual_seed(0)
    q = torch.randn(B, Hq, M, D).to(dtype)
    k, v = (torch.randn(B, Hkv, N, D).to(dtype) for _ in range(2))
    qp, kp = _pos(kw.get("q_start", 0), kw.get("q_stride", 1), M), _pos(kw.get("k_start", 0), kw.get("k_stride", 1), N)
    q_doc = k_doc = None
    if doc_lens is not None:
        q_doc = torch.stack([qp // n for n in doc_lens])
        k_doc = torch.stack([kp // n for n in doc_lens])
    return q, k, v, BlockMask.of(q_doc=q_doc, k_doc=k_doc, **kw), (qp, kp, q_doc, k_doc)


@pytest.mark.parametrize("name,M,N,kw,docs,Hq,Hkv,kernel", CASES, ids=[c[0] for c in CASES])
def test_block_kind_goes_to_the_expected_kernel(cuda_kernels_stubbed, name, M, N, kw, docs, Hq, Hkv, kernel):
    q, k, v, mask, _ = _block(M, N, kw, docs, Hq, Hkv)
    assert cuda_dispatch.choose_cuda_block_kernel(q, k, v, mask)[0] == kernel


@pytest.mark.parametrize("name,M,N,kw,docs,Hq,Hkv,kernel",
                         [c for c in CASES if c[-1] != "triton"], ids=[c[0] for c in CASES if c[-1] != "triton"])
def test_aten_cuda_block_matches_float64_reference_forward_and_backward(cuda_kernels_stubbed, name, M, N, kw, docs,
                                                                        Hq, Hkv, kernel):
    q, k, v, mask, (qp, kp, q_doc, k_doc) = _block(M, N, kw, docs, Hq, Hkv)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, scale=SCALE, causal=kw.get("causal", False),
                                           window=kw.get("window"), doc_ids=q_doc, k_doc=k_doc, q_pos=qp, k_pos=kp)
    dout = torch.randn_like(ref_out)
    ref_out.backward(dout)
    with stats() as s:
        out, lse = block_attention_forward(q, k, v, mask, SCALE, AUTO_CUDA)
        grads = block_attention_backward(dout.half(), q, k, v, out, lse, mask, SCALE, AUTO_CUDA)
    assert s.kernel_calls == {f"{kernel}.forward": 1, f"{kernel}.backward": 1}
    assert lse.dtype == torch.float32 and out.dtype == q.dtype
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows that see no key: lse = -inf"
    finite = ~torch.isneginf(ref_lse)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=2e-3)
    for what, x, r in [("out", out, ref_out), ("dq", grads[0], q64.grad), ("dk", grads[1], k64.grad),
                       ("dv", grads[2], v64.grad)]:
        assert x.dtype == (q.dtype if what == "out" else torch.float32)
        assert rel_err(x, r) < 5e-3, f"{what} rel err {rel_err(x, r):.2e}"


def test_fp32_goes_to_triton_and_fp64_to_math(cuda_kernels_stubbed):
    for dtype, kernel in ((torch.float32, "triton"), (torch.float64, "math"), (torch.bfloat16, "cudnn")):
        q, k, v, mask, _ = _block(16, 16, dict(causal=True), None, 2, 2, dtype=dtype)
        assert cuda_dispatch.choose_cuda_block_kernel(q, k, v, mask)[0] == kernel


def test_head_dims_the_aten_kernels_cannot_take_go_to_triton(cuda_kernels_stubbed):
    q, k, v, mask, _ = _block(16, 16, dict(), None, 2, 2, D=20)
    assert cuda_dispatch.choose_cuda_block_kernel(q, k, v, mask)[0] == "triton"
    q, k, v, mask, _ = _block(16, 16, dict(), None, 2, 2, D=192)       # FA2 up to 256, cuDNN up to 128
    assert cuda_dispatch.choose_cuda_block_kernel(q, k, v, mask)[0] == "flash"


def test_score_mods_never_reach_cudnn_or_fa2(cuda_kernels_stubbed, monkeypatch):
    """ALiBi, soft-capping and Dv != D: Triton when it says it computes them, else math."""
    from seqpar_compiler.kernels import triton_attention
    q, k, v, _, _ = _block(16, 16, dict(), None, 2, 2)
    masks = [BlockMask.of(causal=True, alibi_slopes=torch.tensor([0.5, 0.25])), BlockMask.of(causal=True, softcap=20.0)]
    monkeypatch.setattr(triton_attention, "SCORE_MODS", (), raising=False)
    for mask in masks:
        assert cuda_dispatch.choose_cuda_block_kernel(q, k, v, mask)[0] == "math"
    assert cuda_dispatch.choose_cuda_block_kernel(q, k, v[..., :8], BlockMask.of())[0] == "math"
    monkeypatch.setattr(triton_attention, "SCORE_MODS", ("alibi", "softcap", "dv"), raising=False)
    for mask in masks:
        assert cuda_dispatch.choose_cuda_block_kernel(q, k, v, mask)[0] == "triton"


def test_without_cudnn_full_blocks_go_to_fa2_and_without_both_to_triton(cuda_kernels_stubbed, monkeypatch):
    q, k, v, mask, _ = _block(16, 16, dict(causal=True), None, 2, 2)
    monkeypatch.setattr(cuda_dispatch, "cuda_aten_kernels", lambda device: (False, True))
    assert cuda_dispatch.choose_cuda_block_kernel(q, k, v, mask)[0] == "flash"
    monkeypatch.setattr(cuda_dispatch, "cuda_aten_kernels", lambda device: (False, False))
    assert cuda_dispatch.choose_cuda_block_kernel(q, k, v, mask)[0] == "triton"


def test_documents_that_are_not_runs_go_to_triton(cuda_kernels_stubbed):
    """A document id that comes back after another (not packed contiguously) has no varlen pairing."""
    q, k, v, _, _ = _block(8, 8, dict(), None, 2, 2)
    ids = torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2]] * 2)
    assert cuda_dispatch.choose_cuda_block_kernel(q, k, v, BlockMask.of(q_doc=ids, k_doc=ids))[0] == "triton"


def test_auto_resolves_per_block_on_cuda_only():
    from seqpar_compiler.kernels import resolve_kernel
    assert resolve_kernel("auto", torch.device("cuda"), torch.bfloat16) == AUTO_CUDA
    assert resolve_kernel("auto", torch.device("cpu"), torch.bfloat16) == "aten"


def test_key_padding_never_reaches_cudnn_or_fa2(cuda_kernels_stubbed):
    """ATen's kernels take no per-key validity: a padded block goes to Triton (which computes it)."""
    q, k, v, _, _ = _block(16, 16, dict(), None, 2, 2)
    valid = torch.tensor([[True] * 12 + [False] * 4] * 2)
    for kw in (dict(), dict(causal=True)):
        assert cuda_dispatch.choose_cuda_block_kernel(q, k, v, BlockMask.of(k_valid=valid, **kw))[0] == "triton"


@pytest.mark.parametrize("band,q_start,k_start", [((4, 4), 0, 0), ((4, 4), 32, 24), ((2, 6), 8, 0),
                                                   ((None, 3), 0, 0)])
def test_bidirectional_band_is_one_exact_fa2_call(cuda_kernels_stubbed, band, q_start, k_start):
    """ModernBERT's local window |q - k| <= r is FA2's window_size_left/right: planned, checked
    against every row's visible range, and exact against the float64 reference."""
    import dataclasses
    q, k, v, mask, (qp, kp, _, _) = _block(24, 24, dict(q_start=q_start, k_start=k_start), None, 2, 2)
    mask = dataclasses.replace(mask, spec=mask.spec.with_(behind=band[0], ahead=band[1]))
    assert cuda_dispatch.choose_cuda_block_kernel(q, k, v, mask)[0] == "flash"
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, _ = reference_attention(q64, k64, v64, scale=SCALE, q_pos=qp, k_pos=kp, behind=band[0], ahead=band[1])
    dout = torch.randn_like(ref_out)
    ref_out.backward(dout)
    out, lse = block_attention_forward(q, k, v, mask, SCALE, AUTO_CUDA)
    grads = block_attention_backward(dout.half(), q, k, v, out, lse, mask, SCALE, AUTO_CUDA)
    for x, r in [(out, ref_out), (grads[0], q64.grad), (grads[1], k64.grad), (grads[2], v64.grad)]:
        assert rel_err(x, r) < 5e-3


def test_relative_position_table_goes_to_math(cuda_kernels_stubbed):
    """No CUDA kernel takes a per-head table of the offset: the math kernel evaluates it per tile."""
    import dataclasses
    q, k, v, mask, _ = _block(16, 16, dict(causal=True), None, 2, 2)
    mask = dataclasses.replace(mask, spec=mask.spec.with_(rel_bias=True), rel_bias=torch.zeros(2, 31))
    assert cuda_dispatch.choose_cuda_block_kernel(q, k, v, mask)[0] == "math"
