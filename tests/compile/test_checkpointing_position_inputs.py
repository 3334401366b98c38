"""remat-aware finds each layer's input when positions are a graph input (packed sequences).

trl's padding-free collator passes ``position_ids``; they reach every attention through RoPE and
the document ids, so nothing but the virtual root dominates the second layer's attention node.
The policy used to give up on such graphs ("no layer input found for ring_attention_1") and leave
them to the default partitioner. Single process: at P = 1 the attention op is ATen's SDPA.
"""
import pytest
import torch
import torch.nn.functional as F

from seqpar_compiler.passes import checkpointing
from seqpar_compiler.passes.checkpointing import tag_joint_graph

LAYERS = 3


class _Layer(torch.nn.Module):
    def __init__(self, width=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width, bias=False)
        self.out = torch.nn.Linear(width, width, bias=False)

    def forward(self, x, angle):                       # x [B, S, C], angle [B, S]
        B, S, C = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, S, 3, self.heads, C // self.heads).unbind(2)
        rot = angle.cos()[:, :, None, None]             # position-dependent, from a graph input
        q, k, v = (t.transpose(1, 2) for t in (q * rot, k * rot, v))   # (B, H, S, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.out(y.transpose(1, 2).reshape(B, S, C))


class _PositionsModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 16)
        self.layers = torch.nn.ModuleList(_Layer() for _ in range(LAYERS))

    def forward(self, ids, position_ids):
        x, angle = self.embed(ids), position_ids.float() * 0.1
        for layer in self.layers:
            x = layer(x, angle)
        return x.square().mean()


def _plan(monkeypatch, through_value: bool):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from seqpar_compiler.backend import _is_model_state
    monkeypatch.setattr(checkpointing, "_LAYER_INPUT_THROUGH_VALUE", through_value)
    plans = []

    def backend(gm, ex):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        state = [i for i, (n, v) in enumerate(zip(placeholders, ex)) if _is_model_state(n, v)]

        def partition(joint, inputs, **kw):
            plans.append(tag_joint_graph(joint, "remat-aware", state))
            return min_cut_rematerialization_partition(joint, inputs, **kw)
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward), partition_fn=partition)(gm, ex)
    torch.manual_seed(0)
    torch._dynamo.reset()
    ids = torch.randint(0, 64, (2, 32))
    positions = torch.cat([torch.arange(12), torch.arange(20)]).expand(2, -1)   # two packed documents
    torch.compile(_PositionsModel(), backend=backend)(ids, positions).backward()
    (plan,) = plans
    return plan


def test_each_layer_input_is_found_when_positions_are_a_graph_input(monkeypatch):
    plan = _plan(monkeypatch, through_value=True)
    assert plan.skipped is None and len(plan.attention) == LAYERS and len(plan.layer_inputs) == LAYERS


def test_the_old_search_from_the_attention_node_alone_gives_up(monkeypatch):
    """The test-only switch restores the old search: it pins what the fix changed."""
    plan = _plan(monkeypatch, through_value=False)
    assert plan.skipped is not None and "no layer input found" in plan.skipped
