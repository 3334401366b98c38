"""Blockwise FFN (issue 4): per-token MLP blocks found in the traced graph, run over token chunks
with the hidden activation recomputed in the backward; exact, and the hidden activation
[B, S_local, hidden] never exists whole in the graphs or in the op's bodies."""
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import seqpar_compiler as sp
from seqpar_compiler.passes.blockwise_ffn import blockwise_ffn, find_ffn_blocks
from seqpar_compiler.runtime.ffn_op import blockwise_ffn_backward, blockwise_ffn_forward, blockwise_ffn_op

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
from models import GPT, GPTConfig, Llama, LlamaConfig  # noqa: E402

B, S, C, HIDDEN = 2, 64, 16, 128          # an FFN-heavy layer: hidden = 8 × width


class GeluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, C))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up = nn.Linear(C, HIDDEN, bias=False), nn.Linear(C, HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, C, bias=False)

    def forward(self, x):
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


class LeakyHidden(GeluMLP):
    """The hidden activation is also returned: chunking cannot avoid holding it."""

    def forward(self, x):
        h = self.mlp[1](self.mlp[0](x))
        return self.mlp[2](h), h


def _traced(model, *inputs) -> torch.fx.GraphModule:
    captured = {}

    def capture(gm, ex):
        captured["gm"] = gm
        return gm.forward
    torch._dynamo.reset()
    torch.compile(model, backend=capture)(*inputs)
    return captured["gm"]


def test_gpt_and_llama_blocks_are_found_in_the_traced_graph_one_per_layer():
    idx = torch.randint(0, 256, (1, 16))
    assert len(find_ffn_blocks(_traced(GPT(GPTConfig(n_layer=3)), idx))) == 3
    blocks = find_ffn_blocks(_traced(Llama(LlamaConfig(n_layer=2)), idx))
    assert len(blocks) == 2 and all(b.w_mul is not None and b.activation == "silu" for b in blocks)


def test_a_block_whose_hidden_activation_is_used_elsewhere_is_left_alone():
    assert find_ffn_blocks(_traced(LeakyHidden(), torch.randn(B, S, C))) == []


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu", "relu"])
def test_op_gradients_match_autograd_in_float64(gated, activation):
    g = torch.Generator().manual_seed(0)
    t = (lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True))
    args = (t(2, 5, 4), t(12, 4), t(12), t(12, 4) if gated else None, t(12) if gated else None, t(4, 12), t(4))
    assert torch.autograd.gradcheck(lambda *a: blockwise_ffn_op(*a, activation, 3), args)


@pytest.mark.parametrize("model_cls", [GeluMLP, SwiGLU])
@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_compiled_chunked_block_equals_the_unchunked_one_within_1e_5(model_cls, inner):
    torch.manual_seed(0)
    model, ref = model_cls(), model_cls()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(B, S, C)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch._dynamo.reset()
    out = torch.compile(model, backend=sp.backend(inner=inner, ffn_chunks=4))(x1)
    out.sum().backward()
    ref(x2).sum().backward()

    def rel(a, b):
        return float((a - b).detach().norm() / b.detach().norm())
    assert rel(out, ref(x)) <= 1e-5 and rel(x1.grad, x2.grad) <= 1e-5
    assert max(rel(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters())) <= 1e-5


def _fw_bw_shapes(model, x, chunks) -> tuple[set, set]:
    """Shapes of every tensor in the forward and backward graphs aot_autograd builds after the pass."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    shapes = {"fw": set(), "bw": set()}

    def grab(kind):
        def compiler(gm, _):
            for n in gm.graph.nodes:
                val = n.meta.get("val")
                for v in val if isinstance(val, (list, tuple)) else [val]:
                    if isinstance(v, torch.Tensor):
                        shapes[kind].add(tuple(v.shape))
            return make_boxed_func(gm.forward)
        return compiler

    def backend(gm, ex):
        blockwise_ffn(gm, chunks)
        return aot_autograd(fw_compiler=grab("fw"), bw_compiler=grab("bw"))(gm, ex)
    torch._dynamo.reset()
    torch.compile(model, backend=backend)(x).sum().backward()
    return shapes["fw"], shapes["bw"]


@pytest.mark.parametrize("model_cls", [GeluMLP, SwiGLU])
def test_rewritten_forward_and_backward_graphs_hold_no_whole_hidden_activation(model_cls):
    x = torch.randn(B, S, C, requires_grad=True)
    whole = {(B, S, HIDDEN), (B * S, HIDDEN)}
    fw, bw = _fw_bw_shapes(model_cls(), x, chunks=4)
    assert not (fw | bw) & whole, (fw | bw) & whole
    fw1, bw1 = _fw_bw_shapes(model_cls(), x, chunks=1)       # the check can fail: unchunked holds it
    assert (fw1 | bw1) & whole


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("gated", [False, True])
def test_op_bodies_never_allocate_more_than_one_chunk_of_hidden_activation(gated):
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(B, S, C, generator=g), torch.randn(B, S, C, generator=g)
    w = (lambda *shape: torch.randn(*shape, generator=g))
    args = (x, w(HIDDEN, C), w(HIDDEN), w(HIDDEN, C) if gated else None, None, w(C, HIDDEN), w(C))
    chunks = 4
    with _Shapes() as mode:
        blockwise_ffn_forward(*args, "gelu", chunks)
        blockwise_ffn_backward(dy, *args, "gelu", chunks)
    hidden_rows = [s[0] for s in mode.shapes if len(s) == 2 and s[1] == HIDDEN and s != (HIDDEN, C)]
    assert hidden_rows and max(hidden_rows) <= B * S // chunks, sorted(set(mode.shapes))


def test_bad_chunk_count_is_an_error_naming_the_allowed_values():
    with pytest.raises(ValueError, match="int >= 1"):
        sp.backend(ffn_chunks=0)
