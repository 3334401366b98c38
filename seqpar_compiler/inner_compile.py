"""The inner compile of a frame: seqpar's memory passes, then the inner compiler (inductor or
aot_eager), at P = 1 as on a group.

Reads the graph module the backend hands it (sharded or not) and its example inputs; the
blockwise-FFN pass rewrites the torch-level graph in place, the checkpoint policy goes to the
partitioner. In a group (a compile-agreement window is open) the backward is compiled with the
forward, not lazily at the first ``backward()``: its failure must be agreed on while every rank
can still fall back (``compile_agreement.py``). ``verify`` (``SEQPAR_VERIFY``) compiles without
aot_autograd's donated buffers, since a checked call takes a second backward of the frame.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

__all__ = ["inner_compile", "is_model_state"]

log = logging.getLogger("seqpar")


def is_model_state(node: torch.fx.Node, value) -> bool:
    """A parameter or buffer lifted into the graph by Dynamo (not the user's batch)."""
    name = str(node.target)
    return isinstance(value, torch.nn.Parameter) or "_parameters_" in name or "_buffers_" in name


def _rank_dependent(gm: torch.fx.GraphModule) -> bool:
    """Does the rewritten graph hold a part of the sequence (shapes that differ by rank)?"""
    from seqpar_compiler.passes.placement import SeqRange

    def part(pl) -> bool:
        return isinstance(pl, SeqRange) or isinstance(pl, tuple) and any(part(p) for p in pl)
    return any(part(n.meta.get("seqpar_placement")) for n in gm.graph.nodes)


def inner_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], inner: str, *,
                   checkpoint: str = "none", ffn_chunks: int = 1, verify: bool = False) -> Callable:
    """The memory passes (blockwise FFN on the torch-level graph, the checkpoint policy in the
    partitioner), then ``inner``. Runs at P = 1 too: there the attention op the policy keeps is
    ATen's SDPA instead of the ring."""
    from seqpar_compiler.passes.blockwise_ffn import blockwise_ffn
    from seqpar_compiler.passes.checkpointing import checkpoint_partition_fn, has_user_regions, inductor_partitioner

    from .compile_agreement import faulting, in_window, stage
    with stage("blockwise FFN"):
        if blockwise_ffn(gm, ffn_chunks):
            log.info("seqpar: blockwise FFN over %d token chunks", ffn_chunks)
    # aot_autograd's primals: the graph module's own parameters and buffers (seqpar's local
    # position tables), then the graph inputs; the policy needs to know which are model state
    lifted = (len(dict(gm.named_parameters(remove_duplicate=False)))
              + len(dict(gm.named_buffers(remove_duplicate=False))))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    model_state = list(range(lifted)) + [lifted + i for i, (n, v) in enumerate(zip(placeholders, example_inputs))
                                         if is_model_state(n, v)]
    # in a group, the backward is compiled now, not at the first backward(): a failure there must
    # be agreed on while every rank can still fall back (compile_agreement.py)
    patches = {"force_non_lazy_backward_lowering": True} if in_window() else {}
    if verify:         # SEQPAR_VERIFY takes a second backward of a checked call (retain_graph): no donated buffers
        patches["donated_buffer"] = False
    if _rank_dependent(gm):
        # a graph with parts of the sequence differs by rank (each rank's rows of a chunk, maybe
        # none): two collectives whose inputs happen to be equal on one rank only (the zero rows
        # of two chunks it does not hold) would be merged by aot's common-subexpression pass on
        # that rank alone, and the ranks' collectives would pair up wrongly
        patches["cse"] = False
    with stage("inner compile"), torch._functorch.config.patch(**patches):
        if inner == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager
            if checkpoint == "none" and not has_user_regions(gm):     # the user's regions need the policy
                return aot_eager(gm, example_inputs)
            from functorch.compile import make_boxed_func
            from torch._dynamo.backends.common import aot_autograd
            nop = (lambda g, _: make_boxed_func(g.forward))
            return aot_autograd(fw_compiler=nop, bw_compiler=faulting(nop, "inner backward"),
                                keep_inference_input_mutations=True,
                                partition_fn=faulting(checkpoint_partition_fn(checkpoint, model_state), "partitioner"),
                                )(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx
        if checkpoint == "none" and not has_user_regions(gm):
            return compile_fx(gm, example_inputs)
        return compile_fx(gm, example_inputs,
                          config_patches={"custom_partitioner_fn": inductor_partitioner(checkpoint, model_state)})
