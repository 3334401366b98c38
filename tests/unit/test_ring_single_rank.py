"""Ring attention without a process group (P = 1): plain attention, clear input errors, a
NaN-free merge, the lse gradient, and an op that torch.compile can place in a graph."""
import pytest
import torch
import torch.nn.functional as F

import seqpar_compiler as sp
from seqpar_compiler.kernels import AttentionSpec
from reference import reference_attention, rel_err
from seqpar_compiler.runtime.ring import merge_partial_attention


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("schedule", ["ring", "zigzag", "striped", "distflash"])
def test_single_rank_equals_plain_sdpa(causal, schedule):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 16, requires_grad=True) for _ in range(3))
    out = sp.ring_attention(q, k, v, causal=causal, schedule=schedule)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert rel_err(out, ref) < 1e-6
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    exp = torch.autograd.grad(ref, (q, k, v), g)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, exp))


def _qkv(B=1, Hq=4, Hkv=2, S=8, D=8, dtype=torch.float32):
    return torch.randn(B, Hq, S, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype)


@pytest.mark.parametrize("make,match", [
    (lambda: (*_qkv(Hq=3, Hkv=2),), "multiple of key/value heads"),
    (lambda: (_qkv()[0], _qkv()[1], _qkv()[2].double()), "one dtype"),
    (lambda: (_qkv()[0], _qkv(S=4)[1], _qkv(S=4)[2]), "must agree on batch"),
    (lambda: (_qkv()[0][0], *_qkv()[1:]), "4-D"),
    (lambda: (_qkv()[0], _qkv()[1], _qkv(Hkv=1)[2]), "k and v must agree on batch, heads"),
])
def test_bad_inputs_get_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        sp.ring_attention(*make())


def test_bad_options_get_clear_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        sp.ring_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="allowed: ring, zigzag, striped, distflash"):
        sp.ring_attention(q, k, v, schedule="spiral")
    with pytest.raises(ValueError, match="allowed: auto, aten, triton, math"):
        sp.ring_attention(q, k, v, kernel="cudnn")
    with pytest.raises(ValueError, match=r"doc_ids must be an integer tensor of shape \[B, S_local\]"):
        sp.ring_attention(q, k, v, doc_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        import os
        if os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("interpreter is on in this process")
        sp.ring_attention(q, k, v, kernel="triton")


def test_bad_score_semantics_get_clear_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"alibi_slopes must be a float tensor of shape \[Hq\] = \[4\]"):
        sp.ring_attention(q, k, v, alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="alibi_slopes must be a float tensor"):
        sp.ring_attention(q, k, v, alibi_slopes=torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="alibi_slopes must not require grad"):
        sp.ring_attention(q, k, v, alibi_slopes=torch.ones(4, requires_grad=True))
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="softcap must be a finite float > 0"):
            sp.ring_attention(q, k, v, softcap=bad)
    with pytest.raises(ValueError, match="softcap must be a float > 0"):
        sp.ring_attention(q, k, v, softcap="2")


@pytest.mark.parametrize("kernel", ["aten", "math"])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 5)])
def test_single_rank_alibi_softcap_and_value_head_dim_match_float64(kernel, causal, window):
    """One rank: ALiBi + softcap + Dv = 24 ≠ D = 16 + GQA, forward and backward, against float64."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 32, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 32, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 32, 24, generator=g, requires_grad=True)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    out = sp.ring_attention(q, k, v, causal=causal, window=window, alibi_slopes=slopes, softcap=3.0, kernel=kernel)
    assert out.shape == (2, 4, 32, 24)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference_attention(q64, k64, v64, causal=causal, window=window, alibi_slopes=slopes, softcap=3.0)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), dout.float())
    exp = torch.autograd.grad(ref, (q64, k64, v64), dout)
    assert rel_err(out, ref) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, exp)), [rel_err(a, b) for a, b in zip(got, exp)]


def test_op_with_alibi_and_dv_compiles_with_its_backward():
    """The fake kernel says out is [B, Hq, S, Dv]; slopes are an op input without a gradient."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 16, 8, requires_grad=True), torch.randn(1, 2, 16, 8, requires_grad=True)
    v = torch.randn(1, 2, 16, 12, requires_grad=True)
    slopes = torch.tensor([0.5, 0.125])

    def f(q, k, v, slopes):
        return sp.ring_attention(q * 2, k, v, causal=True, alibi_slopes=slopes, softcap=4.0).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v, slopes), (q, k, v))
    exp = torch.autograd.grad(f(q, k, v, slopes), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, exp))


def test_merge_is_nan_free_when_rows_are_dead_on_either_side():
    inf = float("-inf")
    out = torch.tensor([[0.0], [0.0], [1.0]])
    lse = torch.tensor([inf, inf, 0.5])
    merge_partial_attention(out, lse, torch.tensor([[0.0], [2.0], [5.0]]), torch.tensor([inf, 1.0, inf]))
    assert torch.equal(lse, torch.tensor([inf, 1.0, 0.5]))
    assert torch.equal(out, torch.tensor([[0.0], [2.0], [1.0]]))


def test_merge_is_order_independent():
    torch.manual_seed(0)
    blocks = [(torch.randn(5, 3), torch.randn(5)) for _ in range(4)]
    results = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        out, lse = torch.zeros(5, 3, dtype=torch.float64), torch.full((5,), float("-inf"), dtype=torch.float64)
        for i in order:
            merge_partial_attention(out, lse, blocks[i][0].double(), blocks[i][1].double())
        results.append((out, lse))
    assert torch.allclose(results[0][0], results[1][0]) and torch.allclose(results[0][1], results[1][1])


def test_gradient_through_lse_matches_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = sp.ring_attention(q, k, v, causal=True, return_lse=True)
    loss = (out * 0.5).sum() + (lse ** 2).sum()
    got = torch.autograd.grad(loss, (q, k, v))
    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    ro, rl = reference_attention(qr, kr, vr, causal=True)
    exp = torch.autograd.grad((ro * 0.5).sum() + (rl ** 2).sum(), (qr, kr, vr))
    assert all(rel_err(a, b) < 1e-10 for a, b in zip(got, exp))


def test_fully_masked_query_rows_give_zero_and_no_nan():
    q, k, v = (torch.randn(1, 2, 8, 8, requires_grad=True) for _ in range(3))
    docs = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2]])
    # causal + window 1: every row sees only itself; with docs, still itself
    out = sp.ring_attention(q, k, v, causal=True, window=1, doc_ids=docs)
    assert torch.allclose(out, v)
    out.sum().backward()
    assert not any(torch.isnan(t.grad).any() for t in (q, k, v))


def test_op_compiles_in_a_graph_with_its_backward():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return sp.ring_attention(q * 2, k, v, causal=True).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    exp = torch.autograd.grad(f(q, k, v), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, exp))


def test_stats_count_calls_and_nest():
    q, k, v = _qkv(Hkv=4)
    q.requires_grad_()
    with sp.stats() as outer:
        with sp.stats() as inner:
            sp.ring_attention(q, k, v, causal=True).sum().backward()
        sp.ring_attention(q, k, v)
    assert inner.attention_forward_calls == 1 and inner.attention_backward_calls == 1
    assert outer.attention_forward_calls == 2
    # causal 8x8: 36 visible pairs, 4*B*Hq*D each, forward + backward
    assert inner.attention_flops == 2 * 36 * 4 * 1 * 4 * 8
    assert set(outer.as_dict()) >= {"block_kernel_calls", "bytes_sent", "bytes_received", "control_bytes",
                                    "comm_wait_seconds"}


def test_fake_kernels_say_the_real_shapes_and_strides_with_dv_and_alibi():
    """Inductor plans consumers from the fakes: with Dv ≠ D they must still match the real ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 2, 16, 8, generator=g)
    v, dout = torch.randn(2, 2, 16, 20, generator=g), torch.randn(2, 4, 16, 20, generator=g)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    spec = AttentionSpec.of(causal=True, scale=8 ** -0.5, alibi=True, softcap=2.0).encode()
    opts = (spec, "zigzag", "", True, "auto")
    real = torch.ops.seqpar.ring_attention(q, k, v, *opts, None, None, slopes)
    real_g = torch.ops.seqpar.ring_attention_backward(dout, q, k, v, *real, None, *opts, None, None, slopes)
    with FakeTensorMode() as mode:
        fq, fk, fv, fdout, fs = (mode.from_tensor(t) for t in (q, k, v, dout, slopes))
        fake = torch.ops.seqpar.ring_attention(fq, fk, fv, *opts, None, None, fs)
        fake_g = torch.ops.seqpar.ring_attention_backward(fdout, fq, fk, fv, *fake, None, *opts, None, None, fs)
    for r, f in zip((*real, *real_g), (*fake, *fake_g)):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)
    assert real[0].shape == (2, 4, 16, 20) and real_g[2].shape == v.shape
