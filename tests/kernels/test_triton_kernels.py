"""Triton block kernels against the float64 reference, for every mask kind the ring uses.

Without a GPU the kernels run on CPU tensors under the Triton interpreter. ``TRITON_INTERPRET=1``
must be set before triton is first imported (``triton.jit`` picks interpreted or compiled when
it decorates, and triton's own ``tl.sum``/``tl.max`` are decorated on import) and while the
kernels first launch (triton then lazily imports gluon, which asserts it). This module sets it
for its import and its tests only: the rest of the session, and the processes it spawns, do not
inherit it. In a wider session something has usually imported triton already (``import
seqpar_compiler`` imports torch._dynamo, which imports triton); then one test re-runs this
module in a fresh process that has the variable from the start, and the others skip here.

The interpreter is slow, so shapes are small and tiles are 16 rows: lengths such as 37 and 53
still span several tiles and end in a partial one. With a GPU (and TRITON_INTERPRET unset) the
same tests run compiled on CUDA, plus the bf16/fp16 tests, which are GPU-only because the
interpreter's bf16 ``tl.dot`` is unreliable (garbage seen in triton 3.9).
"""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
INTERPRET = not ON_GPU

with pytest.MonkeyPatch.context() as _mp:
    if INTERPRET:
        _mp.setenv("TRITON_INTERPRET", "1")
    triton = pytest.importorskip("triton")
    from seqpar_compiler.kernels import triton_attention

# triton was imported earlier without the interpreter: its tl.sum/tl.max cannot be interpreted.
RERUN_IN_FRESH_PROCESS = INTERPRET and type(triton.language.sum).__name__ != "InterpretedFunction"


@pytest.mark.skipif(not RERUN_IN_FRESH_PROCESS, reason="triton runs interpreted in this process")
def test_module_passes_in_a_fresh_interpreted_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True,
                            text=True, timeout=280)
    report = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0 and " passed" in result.stdout, report


@pytest.fixture(autouse=True)
def _triton_interpreter(request, monkeypatch):
    fresh_process_test = test_module_passes_in_a_fresh_interpreted_process
    if RERUN_IN_FRESH_PROCESS and request.function is not fresh_process_test:
        pytest.skip(f"triton was imported before TRITON_INTERPRET=1: see {fresh_process_test.__name__}")
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


from reference import reference_attention, rel_err  # noqa: E402
from seqpar_compiler.kernels import (BlockMask, block_attention_backward,  # noqa: E402
                                     block_attention_forward, resolve_kernel)

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TILE = 16
SCALE = 0.3


def _docs(positions, doc_len):
    """Packed documents: ids increase along the sequence, one per ``doc_len`` positions."""
    return positions // doc_len


# (name, M, N, mask kwargs, doc lengths per batch row or None): positions are global, so
# offsets and strides model the blocks of ring, zigzag and striped layouts.
CASES = [
    ("full_odd_lengths", 37, 53, dict(), None),
    ("causal_diag", 40, 40, dict(causal=True), None),
    ("causal_past_block", 20, 20, dict(causal=True, q_start=64, k_start=16), None),
    ("causal_offset_partial", 20, 37, dict(causal=True, q_start=10, k_start=3), None),
    ("striped_later_keys", 24, 24, dict(causal=True, q_start=1, q_stride=4, k_start=2, k_stride=4), None),
    ("striped_earlier_keys", 24, 24, dict(causal=True, q_start=2, q_stride=4, k_start=1, k_stride=4), None),
    ("window_skips_tiles", 53, 53, dict(causal=True, window=7), None),
    ("window_offset", 40, 40, dict(causal=True, window=13, q_start=40, k_start=20), None),
    ("striped_window", 24, 24,
     dict(causal=True, window=30, q_start=3, q_stride=4, k_start=1, k_stride=4), None),
    ("docs_only", 33, 33, dict(), (10,)),
    ("docs_causal", 40, 40, dict(causal=True), (10, 7)),
    ("docs_causal_window_offset", 30, 40, dict(causal=True, window=9, q_start=10), (12, 5)),
]


def _positions(start, stride, n):
    return start + torch.arange(n) * stride


def _run_case(M, N, kw, doc_lens=None, *, B=2, Hq=2, Hkv=1, D=80, dtype=torch.float32,
              q_doc=None, k_doc=None, tile=TILE, dispatch=False, k_valid=None, band=None):
    """Triton forward+backward and the float64 reference (out, lse, dq, dk, dv) of one block."""
    torch.manual_seed(0)
    q = torch.randn(B, Hq, M, D, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, dtype=dtype)
    v = torch.randn(B, Hkv, N, D, dtype=dtype)
    qp = _positions(kw.get("q_start", 0), kw.get("q_stride", 1), M)
    kp = _positions(kw.get("k_start", 0), kw.get("k_stride", 1), N)
    if doc_lens is not None:                 # one doc length per batch row; [1, L] broadcasts
        q_doc = torch.stack([_docs(qp, n) for n in doc_lens])
        k_doc = torch.stack([_docs(kp, n) for n in doc_lens])
    mask = BlockMask.of(q_doc=q_doc, k_doc=k_doc, k_valid=k_valid, **kw)
    if band is not None:                                      # a bidirectional band (behind, ahead)
        mask = dataclasses.replace(mask, spec=mask.spec.with_(behind=band[0], ahead=band[1]))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, scale=SCALE, causal=kw.get("causal", False),
                                           window=kw.get("window"), doc_ids=q_doc, k_doc=k_doc,
                                           q_pos=qp, k_pos=kp, k_valid=k_valid,
                                           behind=None if band is None else band[0],
                                           ahead=None if band is None else band[1])
    dout = torch.randn_like(ref_out)
    ref_out.backward(dout)
    qd, kd, vd, dod = (t.to(DEVICE) for t in (q, k, v, dout.to(dtype)))
    if dispatch:
        out, lse = block_attention_forward(qd, kd, vd, mask, SCALE, "triton")
        grads = block_attention_backward(dod, qd, kd, vd, out, lse, mask, SCALE, "triton")
    else:
        out, lse = triton_attention.triton_block_forward(qd, kd, vd, mask, SCALE, block_m=tile, block_n=tile)
        grads = triton_attention.triton_block_backward(dod, qd, kd, vd, out, lse, mask, SCALE,
                                                       block_m=tile, block_n=tile)
    got = tuple(t.cpu() for t in (out, lse, *grads))
    return got, (ref_out.detach(), ref_lse, q64.grad, k64.grad, v64.grad)


def _assert_matches(got, ref, tol=1e-5):
    out, lse, dq, dk, dv = got
    r_out, r_lse, r_dq, r_dk, r_dv = ref
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(r_lse)), "dead rows must have lse = -inf"
    finite = ~torch.isneginf(r_lse)
    assert torch.allclose(lse[finite].double(), r_lse[finite], atol=tol)
    for name, x, r in [("out", out, r_out), ("dq", dq, r_dq), ("dk", dk, r_dk), ("dv", dv, r_dv)]:
        assert not torch.isnan(x).any(), f"{name} has NaN"
        assert rel_err(x, r) < tol, f"{name} rel err {rel_err(x, r):.2e}"


@pytest.mark.parametrize("name,M,N,kw,doc_lens", CASES, ids=[c[0] for c in CASES])
def test_triton_block_matches_float64_reference(name, M, N, kw, doc_lens):
    got, ref = _run_case(M, N, kw, doc_lens)
    _assert_matches(got, ref)


@pytest.mark.parametrize("Hq,Hkv", [(3, 1), (4, 2), (2, 2)])
def test_gqa_reads_kv_head_by_index(Hq, Hkv):
    """Query head h reads kv head h // (Hq // Hkv); dk/dv sum over the group's query heads."""
    got, ref = _run_case(24, 24, dict(causal=True), B=1, Hq=Hq, Hkv=Hkv, D=32)
    _assert_matches(got, ref)


@pytest.mark.parametrize("D", [16, 96, 256])
def test_head_dims_pad_to_power_of_two(D):
    got, ref = _run_case(20, 20, dict(causal=True, q_start=4), B=1, Hq=1, Hkv=1, D=D)
    _assert_matches(got, ref)


def test_block_no_row_can_see_gives_zero_out_neg_inf_lse_zero_grads():
    """Every key is in the future (the upper triangle of a ring step): nothing may be NaN."""
    got, _ = _run_case(20, 20, dict(causal=True, q_start=0, k_start=100), B=1)
    out, lse, dq, dk, dv = got
    assert torch.isneginf(lse).all()
    for x in (out, dq, dk, dv):
        assert (x == 0).all()


def test_rows_of_a_document_without_keys_give_zero_and_neg_inf():
    """Rows 0..3 of batch 0 are in document 7, which no key has."""
    q_doc = torch.tensor([[7] * 4 + [1] * 6 + [2] * 10, [1] * 20])
    k_doc = torch.tensor([[1] * 8 + [2] * 12, [1] * 4 + [3] * 16])
    got, ref = _run_case(20, 20, dict(causal=True), q_doc=q_doc, k_doc=k_doc)
    out, lse = got[0], got[1]
    assert torch.isneginf(lse[0, :, :4]).all() and (out[0, :, :4] == 0).all()
    _assert_matches(got, ref)


def test_block_gradients_with_merged_lse_add_up_to_full_attention():
    """The ring's backward: each key block gets the *merged* (out, lse); the block dq's sum and
    the block dk/dv's concatenate to the gradients of attention over all keys."""
    torch.manual_seed(1)
    B, H, M, N, D, split = 1, 2, 24, 40, 32, 17
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True) for L in (M, N, N))
    qp = torch.arange(M) + 16
    out, lse = reference_attention(q, k, v, scale=SCALE, causal=True, q_pos=qp)
    dout = torch.randn_like(out)
    out.backward(dout)
    f = {name: t.detach().float().to(DEVICE)
         for name, t in dict(q=q, k=k, v=v, out=out, lse=lse, dout=dout).items()}
    dq = torch.zeros(B, H, M, D)
    dks, dvs = [], []
    for k0, k1 in [(0, split), (split, N)]:
        mask = BlockMask.of(causal=True, q_start=16, k_start=k0)
        g = triton_attention.triton_block_backward(
            f["dout"], f["q"], f["k"][:, :, k0:k1], f["v"][:, :, k0:k1], f["out"], f["lse"], mask, SCALE,
            block_m=TILE, block_n=TILE)
        dq += g[0].cpu()
        dks.append(g[1].cpu())
        dvs.append(g[2].cpu())
    assert rel_err(dq, q.grad) < 1e-5
    assert rel_err(torch.cat(dks, 2), k.grad) < 1e-5
    assert rel_err(torch.cat(dvs, 2), v.grad) < 1e-5


def test_strided_views_need_no_copy_of_rows():
    """q/k/v as [B,S,H,D] transposed to [B,H,S,D] (what a QKV projection yields)."""
    torch.manual_seed(2)
    B, H, S, D = 1, 2, 30, 48
    q, k, v = (torch.randn(B, S, H, D).transpose(1, 2) for _ in range(3))
    mask = BlockMask.of(causal=True)
    out, lse = triton_attention.triton_block_forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), mask, SCALE,
                                                     block_m=TILE, block_n=TILE)
    ref_out, ref_lse = reference_attention(q, k, v, scale=SCALE, causal=True)
    assert rel_err(out.cpu(), ref_out) < 1e-5
    assert rel_err(lse.cpu(), ref_lse) < 1e-5


def test_dispatch_runs_triton_with_default_tiles(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if DEVICE.type == "cpu" else "0")
    assert resolve_kernel("triton", DEVICE, torch.float32) == "triton"
    got, ref = _run_case(37, 45, dict(causal=True, q_start=8), dispatch=True)
    _assert_matches(got, ref)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_kernel("triton", torch.device("cpu"), torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA (the interpreter's bf16/fp16 tl.dot is unreliable)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [dict(causal=True),
                                dict(causal=True, q_start=2, q_stride=4, k_start=1, k_stride=4),
                                dict(causal=True, window=50)], ids=["causal", "striped", "window"])
def test_low_precision_close_to_reference_on_gpu(dtype, kw):
    got, ref = _run_case(300, 300, kw, Hq=4, Hkv=2, D=128, dtype=dtype, tile=None)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for x, r in zip(got, ref):
        finite = ~torch.isneginf(r)
        assert rel_err(x[finite].float(), r[finite]) < 2e-2


def _padding(B, N, seed=0):
    """Random key validity with whole tiles of padding (skipped) and ragged edges."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(B, N, generator=g) > 0.3
    valid[0, :TILE] = False
    return valid


@pytest.mark.parametrize("name", ["causal_offset_partial",
                                  *(pytest.param(n, marks=pytest.mark.slow) for n in (
                                      "full_odd_lengths", "striped_later_keys", "window_offset", "docs_causal"))])
def test_triton_key_padding_matches_float64_reference(name):
    _, M, N, kw, doc_lens = next(c for c in CASES if c[0] == name)
    got, ref = _run_case(M, N, kw, doc_lens, k_valid=_padding(2, N))
    _assert_matches(got, ref)


def test_triton_key_padding_hiding_every_key_of_a_row_gives_zero_and_neg_inf():
    k_valid = torch.tensor([[True] * 40, [False] * 20 + [True] * 20])
    got, ref = _run_case(40, 40, dict(causal=True), k_valid=k_valid)
    assert torch.isneginf(got[1][1, :, :20]).all() and (got[0][1, :, :20] == 0).all()
    _assert_matches(got, ref)


@pytest.mark.parametrize("band,q_start,k_start", [((8, 8), 30, 0), *(
    pytest.param(*c, marks=pytest.mark.slow) for c in (((8, 8), 0, 0), ((0, 5), 10, 30), ((None, 3), 0, 20),
                                                       ((7, None), 40, 0)))])
def test_triton_bidirectional_band_matches_float64_reference(band, q_start, k_start):
    got, ref = _run_case(37, 37, dict(q_start=q_start, k_start=k_start), band=band)
    _assert_matches(got, ref)
