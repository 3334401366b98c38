"""Blockwise FFN (BPT, docs/architecture.md): run per-token MLP blocks over slices of the local sequence.

Reads: a torch-level FX graph (Dynamo's, or the sharded graph from ``rewrite``), matching ops by
their targets, never by module names. Writes: each matched block replaced by one
``seqpar::blockwise_ffn`` node (``runtime/ffn_op.py``) with ``node.meta["seqpar_blockwise_ffn"]``
= the activation name, and the block's old nodes removed.

Matched blocks (every intermediate used only inside the block, so nothing else needs the hidden
activation whole):
  * plain:  ``linear(act(linear(x, W1, b1)), W2, b2)``                       (GPT MLP)
  * gated:  ``linear(act(linear(x, Wg, bg)) * linear(x, Wu, bu), W2, b2)``   (SwiGLU, GeGLU)
with ``act`` one of GELU (exact or tanh), SiLU, ReLU. Blocks written another way (a GELU
spelled out as a tanh formula, GPT-2's Conv1D ``addmm``) are left as they are: correct, unchunked.
Under autocast the pass does nothing yet (the op has no autocast rule).

Why an op and not tags: the op's forward and backward both loop over token slices, so the
``[tokens, hidden]`` activation never exists whole, whatever the partitioner or inductor decide
around it. The block's input x is what its backward needs (and what the partitioner saves or
recomputes, like any other activation).
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from seqpar_compiler.runtime.ffn_op import blockwise_ffn_op  # noqa: F401 - registers the op pair

__all__ = ["FFNBlock", "find_ffn_blocks", "blockwise_ffn"]

log = logging.getLogger("seqpar")

_LINEAR = {torch._C._nn.linear, F.linear}
_MUL = {operator.mul, torch.mul, torch.Tensor.mul}


def _activation(node: fx.Node) -> str | None:
    """The activation name of a node applying one, else None."""
    if node.op != "call_function":
        return None
    t = node.target
    if t in (torch._C._nn.gelu, F.gelu):
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    if t in (F.silu, torch._C._nn.silu) and not node.kwargs.get("inplace", False):
        return "silu"
    if t in (F.relu, torch.relu) and not node.kwargs.get("inplace", False):
        return "relu"
    return None


def _linear_args(node) -> tuple | None:
    """(x, weight, bias) of a ``linear`` node, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _LINEAR:
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    x, w, b = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
    return (x, w, b) if isinstance(x, fx.Node) and isinstance(w, fx.Node) else None


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


@dataclass
class FFNBlock:
    """One matched block: its input, weights, activation, the output node and the nodes it replaces."""

    x: fx.Node
    w_act: fx.Node
    b_act: fx.Node | None
    w_mul: fx.Node | None
    b_mul: fx.Node | None
    w_out: fx.Node
    b_out: fx.Node | None
    activation: str
    out: fx.Node
    inner: tuple

    def replace_with_blockwise(self, graph: fx.Graph, chunks: int) -> fx.Node:
        with graph.inserting_before(self.out):
            new = graph.call_function(torch.ops.seqpar.blockwise_ffn.default,
                                      (self.x, self.w_act, self.b_act, self.w_mul, self.b_mul, self.w_out,
                                       self.b_out, self.activation, chunks))
        new.meta.update({k: v for k, v in self.out.meta.items() if k != "seqpar_placement"})
        new.meta["seqpar_placement"] = self.out.meta.get("seqpar_placement")
        new.meta["seqpar_blockwise_ffn"] = self.activation
        self.out.replace_all_uses_with(new)
        for node in (self.out, *self.inner):
            graph.erase_node(node)
        return new


def _match(out: fx.Node) -> FFNBlock | None:
    lin2 = _linear_args(out)
    if lin2 is None:
        return None
    hidden, w_out, b_out = lin2
    if not _only_user(hidden, out):
        return None
    act = _activation(hidden)
    if act is not None:                                                   # plain
        lin1 = _linear_args(hidden.args[0])
        if lin1 is None or not _only_user(hidden.args[0], hidden):
            return None
        return FFNBlock(lin1[0], lin1[1], lin1[2], None, None, w_out, b_out, act, out, (hidden, hidden.args[0]))
    if hidden.op != "call_function" or hidden.target not in _MUL or len(hidden.args) != 2 or hidden.kwargs:
        return None
    for gate, up in (hidden.args, hidden.args[::-1]):                    # gated: act(gate(x)) * up(x)
        if not (isinstance(gate, fx.Node) and isinstance(up, fx.Node)) or gate is up:
            continue
        act = _activation(gate)
        lin_g = _linear_args(gate.args[0]) if act else None
        lin_u = _linear_args(up)
        if lin_g is None or lin_u is None or lin_g[0] is not lin_u[0]:
            continue
        if not (_only_user(gate, hidden) and _only_user(up, hidden) and _only_user(gate.args[0], gate)):
            continue
        return FFNBlock(lin_g[0], lin_g[1], lin_g[2], lin_u[1], lin_u[2], w_out, b_out, act, out,
                        (hidden, gate, gate.args[0], up))
    return None


def find_ffn_blocks(gm: fx.GraphModule) -> list[FFNBlock]:
    """Every per-token MLP block of the graph, in graph order."""
    return [b for b in (_match(n) for n in gm.graph.nodes) if b is not None]


def _under_autocast(gm: fx.GraphModule) -> bool:
    """Autocast on at compile time (a ``with torch.autocast`` around the compiled call) or
    entered inside the graph."""
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    if any(torch.is_autocast_enabled(d) for d in devices):
        return True
    return any(n.op == "call_function" and "_enter_autocast" in getattr(n.target, "__name__", "")
               for n in gm.graph.nodes)


def blockwise_ffn(gm: fx.GraphModule, chunks: int) -> int:
    """Replace every matched block by ``seqpar::blockwise_ffn`` over ``chunks`` token slices.

    Returns the number of blocks rewritten; ``chunks == 1`` rewrites nothing (the unchunked
    block is the same computation with inductor's fusions).
    """
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"ffn_chunks must be an int >= 1; got {chunks!r}")
    if chunks == 1:
        return 0
    if _under_autocast(gm):
        # the op has no autocast rule: its linears would run in fp32 where autocast runs bf16
        log.info("seqpar: blockwise FFN skipped: the graph runs under autocast")
        return 0
    count = 0
    for node in list(gm.graph.nodes):          # replace as found: a block may feed the next one
        block = _match(node) if node.graph is gm.graph else None
        if block is not None:
            block.replace_with_blockwise(gm.graph, chunks)
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
