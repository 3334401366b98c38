"""What the ring op allocates and how its results are laid out, on one rank (P = 1).

The ring's results are laid out as [B, S, H, D] in memory (the wire layout) whatever the
inputs' strides, and the op's fake kernels must say exactly that: inductor plans the consumers
of a custom op's outputs from the fake's strides, so a mismatch would be read wrongly, silently.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from allocation_probe import count_new_buffers
from seqpar_compiler.runtime.comm import RingComm
from seqpar_compiler.kernels import AttentionSpec
from seqpar_compiler.runtime.ring import RingConfig, ring_backward, ring_forward

B, HQ, HKV, S, D = 2, 4, 2, 48, 16

LAYOUTS = {
    "bhsd": lambda t: t.contiguous(),
    "bshd": lambda t: t.transpose(1, 2).contiguous().transpose(1, 2),
    "sbhd": lambda t: t.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3),
}


def _inputs(layout, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, S, D, generator=g)
    k, v = torch.randn(B, HKV, S, D, generator=g), torch.randn(B, HKV, S, D, generator=g)
    dout = torch.randn(B, HQ, S, D, generator=g)
    return [LAYOUTS[layout](t.to(dtype)) for t in (q, k, v, dout)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_real_results_have_the_fake_kernels_strides(layout, dtype):
    q, k, v, dout = _inputs(layout, dtype)
    opts = (AttentionSpec.of(causal=True, scale=D ** -0.5).encode(), "zigzag", "", True, "auto")
    out, lse = torch.ops.seqpar.ring_attention(q, k, v, *opts)
    grads = torch.ops.seqpar.ring_attention_backward(dout, q, k, v, out, lse, None, *opts)
    with FakeTensorMode() as mode:
        fq, fk, fv, fdout = (mode.from_tensor(t) for t in (q, k, v, dout))
        f_out, f_lse = torch.ops.seqpar.ring_attention(fq, fk, fv, *opts)
        f_grads = torch.ops.seqpar.ring_attention_backward(fdout, fq, fk, fv, f_out, f_lse, None, *opts)
    for name, real, fake in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (f_out, f_lse, *f_grads)):
        assert (real.shape, real.stride(), real.dtype) == (fake.shape, fake.stride(), fake.dtype), name


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_one_rank_allocates_what_sdpa_does(layout):
    """Forward: the kernel's result is the output (plus one copy into the wire layout when the
    kernel returns another); backward: the kernel's three gradients are the results. No
    contiguous copies of the inputs, no zero-filled accumulators, no merge temporaries."""
    q, k, v, dout = _inputs(layout)
    cfg = RingConfig(schedule="zigzag", spec=AttentionSpec.of(causal=True, scale=D ** -0.5), kernel="aten",
                     overlap=True)
    comm = RingComm(None)
    (out, lse), fwd = count_new_buffers(lambda: ring_forward(q, k, v, None, cfg, comm), k.numel())
    _, bwd = count_new_buffers(lambda: ring_backward(dout, q, k, v, out, lse, None, cfg, comm), k.numel())
    kernel = ["_scaled_dot_product_flash_attention_for_cpu.default"]
    # ATen's flash kernel lays its result out as [B, S, H, D] only for such queries
    assert fwd == (kernel if layout == "bshd" else kernel + ["empty.memory_format"]), fwd
    assert bwd == ["_scaled_dot_product_flash_attention_for_cpu_backward.default"] * 3, bwd
