"""The ring on Triton block kernels: P=2 gloo ranks under the Triton interpreter (CPU), and a
GPU smoke test of the whole op that runs wherever CUDA is present."""
import importlib.util
import math

import pytest
import torch

import ring_workers as W
from seqpar_compiler.launch import run_ranks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_zigzag_causal_ring_with_seqpar_kernel_triton_matches_float64_reference():
    case = ("zigzag-causal-triton", "accuracy",
            dict(schedule="zigzag", causal=True, S_local=16, D=16, Hq=2, Hkv=1, B=1))
    res = run_ranks(W.run_cases, 2, [case], env={"TRITON_INTERPRET": "1", "SEQPAR_KERNEL": "triton"},
                    timeout=400)
    assert all(r["kernel_calls"]["triton"] > 0 for r in res), "the triton kernels did not run"
    for key in ("out", "dq", "dk", "dv"):
        num = sum(r[case[0]][key][0] for r in res)
        den = sum(r[case[0]][key][1] for r in res)
        assert math.sqrt(num / den) <= 1e-5, (key, math.sqrt(num / den))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_smoke_ring_attention_on_triton_kernels():
    import seqpar_compiler as sp
    from reference import reference_attention, rel_err
    q, k, v = (torch.randn(1, 4, 256, 64, device="cuda", requires_grad=True) for _ in range(3))
    out = sp.ring_attention(q, k, v, causal=True, kernel="triton")
    out.sum().backward()
    ref, _ = reference_attention(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), causal=True)
    assert rel_err(out.detach().cpu(), ref) < 1e-4
