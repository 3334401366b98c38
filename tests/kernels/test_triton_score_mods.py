"""Triton block kernels with issue 12's score semantics (ALiBi over global positions,
soft-capping, Dv ≠ D) against the float64 reference, for the mask kinds the ring uses.

Runs like tests/kernels/test_triton_kernels.py: compiled on a GPU, else on CPU tensors under the
Triton interpreter, in a fresh process when triton was imported before TRITON_INTERPRET=1
(see that module's docstring). Shapes are small and tiles 16 rows (the interpreter is slow).
"""
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
    if RERUN_IN_FRESH_PROCESS and request.function is not test_module_passes_in_a_fresh_interpreted_process:
        pytest.skip("triton was imported before TRITON_INTERPRET=1: see the fresh-process test")
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


from reference import reference_attention, rel_err  # noqa: E402
from seqpar_compiler.kernels import BlockMask  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TILE = 16
SCALE = 0.3
SLOPES = torch.tensor([0.25, 0.0625])

# (name, M, N, mask kwargs, doc length or None): global positions model ring blocks
CASES = [
    ("full_past_block", 37, 21, dict(q_start=100, k_start=20), None),
    ("causal_diag", 40, 40, dict(causal=True), None),
    ("striped", 24, 24, dict(causal=True, q_start=2, q_stride=4, k_start=1, k_stride=4), None),
    ("window_offset", 40, 40, dict(causal=True, window=13, q_start=40, k_start=20), None),
    ("docs_causal", 33, 33, dict(causal=True), 10),
]
SEMANTICS = {"alibi": dict(alibi=True), "softcap": dict(softcap=2.0), "dv24": dict(Dv=24),
             "alibi+softcap+dv48": dict(alibi=True, softcap=2.0, Dv=48)}


def _run(M, N, kw, doc_len, *, alibi=False, softcap=None, Dv=32, D=32, B=2, Hq=2, Hkv=1):
    torch.manual_seed(0)
    q, k = torch.randn(B, Hq, M, D), torch.randn(B, Hkv, N, D)
    v = torch.randn(B, Hkv, N, Dv)
    qp = kw.get("q_start", 0) + torch.arange(M) * kw.get("q_stride", 1)
    kp = kw.get("k_start", 0) + torch.arange(N) * kw.get("k_stride", 1)
    q_doc = k_doc = None
    if doc_len is not None:
        q_doc, k_doc = (qp // doc_len)[None].expand(B, M), (kp // doc_len)[None].expand(B, N)
    slopes = SLOPES if alibi else None
    mask = BlockMask.of(q_doc=q_doc, k_doc=k_doc, alibi_slopes=slopes, softcap=softcap, **kw)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, scale=SCALE, causal=kw.get("causal", False),
                                           window=kw.get("window"), doc_ids=q_doc, k_doc=k_doc, q_pos=qp,
                                           k_pos=kp, alibi_slopes=slopes, softcap=softcap)
    dout = torch.randn_like(ref_out)
    ref_out.backward(dout)
    qd, kd, vd, dod = (t.to(DEVICE) for t in (q, k, v, dout.float()))
    out, lse = triton_attention.triton_block_forward(qd, kd, vd, mask, SCALE, block_m=TILE, block_n=TILE)
    grads = triton_attention.triton_block_backward(dod, qd, kd, vd, out, lse, mask, SCALE, block_m=TILE,
                                                   block_n=TILE)
    got = [t.cpu() for t in (out, lse, *grads)]
    return got, (ref_out.detach(), ref_lse, q64.grad, k64.grad, v64.grad)


@pytest.mark.parametrize("sem", sorted(SEMANTICS))
@pytest.mark.parametrize("name,M,N,kw,doc_len", CASES, ids=[c[0] for c in CASES])
def test_triton_score_semantics_match_float64_reference(sem, name, M, N, kw, doc_len):
    got, ref = _run(M, N, kw, doc_len, **SEMANTICS[sem])
    lse, r_lse = got[1], ref[1]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(r_lse))
    finite = ~torch.isneginf(r_lse)
    assert torch.allclose(lse[finite].double(), r_lse[finite], atol=1e-5)
    for label, x, r in zip(("out", "dq", "dk", "dv"), (got[0], *got[2:]), (ref[0], *ref[2:])):
        assert x.shape == r.shape, (label, x.shape, r.shape)
        assert not torch.isnan(x).any(), label
        assert rel_err(x, r) < 1e-5, f"{label} rel err {rel_err(x, r):.2e}"
