"""SEQPAR_CHECKPOINT as a partitioner policy, in one process (issue 4): at P = 1 the attention op
the policy keeps is ATen's SDPA; the ring case runs in tests/dist/test_checkpointing_dist.py."""
import os
import sys

import pytest
import torch

import seqpar_compiler as sp
from seqpar_compiler.passes.checkpointing import checkpoint_partition_fn, tag_joint_graph

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
from models import GPT, GPTConfig, Llama, LlamaConfig  # noqa: E402

LAYERS = 3
MODELS = {"gpt": lambda: GPT(GPTConfig(n_layer=LAYERS)), "llama": lambda: Llama(LlamaConfig(n_layer=LAYERS))}


def _batch(S=32):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, S), generator=g), torch.randint(0, 256, (2, S), generator=g)


def _partitioned(model_name: str, policy: str) -> dict:
    """The forward and backward graphs aot_autograd builds for one training step under ``policy``."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from seqpar_compiler.backend import _is_model_state
    graphs = {}

    def grab(kind):
        def compiler(gm, _):
            graphs[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler

    def backend(gm, ex):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        state = [i for i, (n, v) in enumerate(zip(placeholders, ex)) if _is_model_state(n, v)]
        return aot_autograd(fw_compiler=grab("fw"), bw_compiler=grab("bw"),
                            partition_fn=checkpoint_partition_fn(policy, state))(gm, ex)
    torch.manual_seed(0)
    torch._dynamo.reset()
    torch.compile(MODELS[model_name](), backend=backend)(*_batch())[1].backward()
    return graphs


def _attention_forwards(gm) -> int:
    """SDPA forwards in a graph (a recomputed one is wrapped to replay its RNG state)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and
               ("flash_attention_for_cpu.default" in str(n.target) or "run_with_rng_state" in str(n.target)))


def _saved_activation_bytes(graphs) -> int:
    fw_out = next(n for n in graphs["fw"].graph.nodes if n.op == "output").args[0]
    saved = [a for a in fw_out[2:] if isinstance(a, torch.fx.Node) and a.op != "placeholder"]
    return sum(a.meta["val"].numel() * a.meta["val"].element_size() for a in saved
               if isinstance(a.meta.get("val"), torch.Tensor))


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_remat_aware_backward_never_reruns_attention_forward(model):
    assert _attention_forwards(_partitioned(model, "remat-aware")["bw"]) == 0


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_full_backward_reruns_attention_forward_once_per_layer(model):
    assert _attention_forwards(_partitioned(model, "full")["bw"]) == LAYERS


def test_saved_activations_shrink_from_none_to_remat_aware_to_full():
    none, remat, full = (_saved_activation_bytes(_partitioned("gpt", p)) for p in ("none", "remat-aware", "full"))
    assert full < remat < none, (none, remat, full)


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_one_layer_input_is_found_per_attention_layer(model):
    plans = []

    def backend(gm, ex):
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.partitioners import min_cut_rematerialization_partition
        from seqpar_compiler.backend import _is_model_state
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        state = [i for i, (n, v) in enumerate(zip(placeholders, ex)) if _is_model_state(n, v)]

        def partition(joint, inputs, **kw):
            plans.append(tag_joint_graph(joint, "remat-aware", state))
            return min_cut_rematerialization_partition(joint, inputs, **kw)
        from functorch.compile import make_boxed_func
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward), partition_fn=partition)(gm, ex)
    torch._dynamo.reset()
    torch.compile(MODELS[model](), backend=backend)(*_batch())[1].backward()
    (plan,) = plans
    assert plan.skipped is None and len(plan.attention) == LAYERS and len(plan.layer_inputs) == LAYERS


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_policies_leave_the_same_gradients_through_the_backend(model):
    grads = {}
    for policy in ("none", "remat-aware", "full"):
        torch.manual_seed(0)
        m = MODELS[model]()
        torch._dynamo.reset()
        torch.compile(m, backend=sp.backend(inner="aot_eager", checkpoint=policy))(*_batch())[1].backward()
        grads[policy] = [p.grad for p in m.parameters()]
    for policy in ("remat-aware", "full"):
        worst = max(float((a - b).norm() / b.norm()) for a, b in zip(grads[policy], grads["none"]))
        assert worst <= 1e-5, (policy, worst)


def test_unknown_policy_is_an_error_listing_the_allowed_ones():
    with pytest.raises(ValueError, match="remat-aware, full, none"):
        sp.backend(checkpoint="layers")
