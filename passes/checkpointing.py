"""Rematerialization-aware checkpointing: a partitioner policy for aot_autograd (docs/architecture.md).

Reads the *joint* forward/backward graph that aot_autograd hands its partitioner; writes
``node.meta["recompute"]`` (a ``torch.utils.checkpoint.CheckpointPolicy``) on forward nodes, the
same tags selective activation checkpointing writes, then calls torch's own
``min_cut_rematerialization_partition``, which honours them: a MUST_SAVE node is saved, a
PREFER_RECOMPUTE node is recomputed in the backward wherever the backward needs it.

Policies (``SEQPAR_CHECKPOINT``):
  * ``remat-aware`` (DistFlashAttn): attention's outputs ``(out, lse)`` and each layer's input
    are saved; everything else (norms, projections, RoPE, activations, FFN) is recomputed. The
    attention *backward* needs exactly ``(q, k, v, out, lse)``; q, k, v are cheap projections of
    the saved layer input, so attention's forward runs once per step: 2 forwards + 1 backward.
  * ``full``: only each layer's input is saved and attention itself is recomputed, which is what
    checkpointing whole layers does: 3 forwards + 1 backward, the least memory.
  * ``none``: no tags; the partitioner's own heuristics decide (what the inner compiler does
    without seqpar).

"Layer input" without layer boundaries: for each attention node, walk up its chain of
dominators in the forward dataflow (every path from the batch inputs to the attention passes
through a dominator; parameters and buffers are not part of that flow) to the nearest one that
is also used outside the computation feeding the attention: the residual stream ``x`` of
``x + attn(norm(x))``. Saving it keeps each layer's recomputation local to the layer: recomputing
from the graph inputs alone would rebuild every layer's activations at the start of the backward
and keep them alive until their layer's gradient, which is no checkpointing at all. (The issue's
"full saves the ring op's inputs" would hold q, k, v: three times attention's output; the layer
input from which they are recomputed is smaller and is what layer checkpointing saves.)

The attention ops are ``seqpar::ring_attention`` (P > 1) and ATen's fused SDPA ops (P = 1: a
single process runs SDPA, whose backward takes the same ``(q, k, v, out, logsumexp)``).
The user's own checkpoint regions (``torch.utils.checkpoint`` bodies, inlined by
``hop_bodies.py`` with torch's ``recompute`` / ``ac_graph_id`` tags) are honoured under every
policy (``user_regions.py``): ``none`` keeps the user's choice (attention inside is recomputed:
two forwards), ``remat-aware`` keeps it too but saves the attention op's (out, lse), ``full``
applies its own tags. A selective-checkpoint policy (``context_fn``) is evaluated per ATen op,
and asked about the ring op as the SDPA op it replaces.
Random ops and collectives are never tagged: recomputing dropout would draw a different mask,
and recomputing a collective would add communication to the backward.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from .user_regions import tag_user_regions
from .mask_proof import ancestors

__all__ = ["POLICIES", "CheckpointPlan", "attention_ops", "tag_joint_graph", "checkpoint_partition_fn",
           "inductor_partitioner", "SeqparPartitioner", "has_user_regions"]

log = logging.getLogger("seqpar")

POLICIES = ("remat-aware", "full", "none")


def attention_ops() -> set:
    """Ops whose outputs (out, lse) are what their backward needs besides q, k, v."""
    import seqpar_compiler.runtime  # noqa: F401 - registers seqpar::ring_attention
    aten = torch.ops.aten
    ops = {torch.ops.seqpar.ring_attention.default, torch.ops.seqpar.ulysses_attention.default}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    return ops


@dataclass
class CheckpointPlan:
    """What a policy decided for one joint graph (for logs and tests)."""

    policy: str
    attention: list = field(default_factory=list)      # attention nodes
    layer_inputs: list = field(default_factory=list)   # saved residual-stream values
    recomputed: int = 0                                 # forward nodes tagged PREFER_RECOMPUTE
    skipped: str | None = None                          # why nothing was tagged


def _forward_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Joint-graph nodes that do not depend on a tangent, in order."""
    backward: set[fx.Node] = set()
    forward = []
    for node in graph.nodes:
        if node.op == "output":
            continue
        if (node.op == "placeholder" and str(node.target).startswith("tangents")) or \
                any(a in backward for a in node.all_input_nodes):
            backward.add(node)
        else:
            forward.append(node)
    return forward


def _dominators(forward: list[fx.Node], sources: set[fx.Node]) -> dict[fx.Node, fx.Node | None]:
    """Immediate dominators of the forward nodes reachable from ``sources`` (None: the virtual
    root above all sources). Nodes fed only by parameters, buffers or constants are absent."""
    idom: dict[fx.Node, fx.Node | None] = {}
    depth: dict[fx.Node | None, int] = {None: 0}

    def lca(a, b):
        while a is not b:
            if depth[a] < depth[b]:
                a, b = b, a
            a = idom[a]
        return a
    for node in forward:                      # graph order is topological
        if node in sources:
            preds: list = [None]
        else:
            preds = [a for a in node.all_input_nodes if a in idom]
            if not preds:
                continue
        d = preds[0]
        for p in preds[1:]:
            d = lca(d, p)
        idom[node] = d
        depth[node] = depth[d] + 1
    return idom


def _ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node ``node`` is computed from (not ``node`` itself)."""
    return set(ancestors(node)) - {node}


def _is_view(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.returns and schema.returns[0].alias_info is not None
                and not schema.returns[0].alias_info.is_write)


# Test-only: False restores the search from the attention node alone, which finds no layer input
# when positions arrive as a graph input (packed sequences) and leaves the graph untagged.
_LAYER_INPUT_THROUGH_VALUE = True


def _layer_input(attn: fx.Node, idom: dict, live: set) -> fx.Node | None:
    """The nearest dominator of ``attn`` used outside the computation that feeds it (the
    residual stream), looking through views to the tensor that owns the memory. Only uses that
    lead to a forward output count (a norm's saved statistics feed only the backward).

    Position ids passed in as a graph input (packed sequences: trl's padding-free collator,
    transformers' ``position_ids``) reach every attention through RoPE and the document ids, so
    from the second layer on nothing but the virtual root dominates the attention node itself.
    The value projection is computed from the residual stream alone: its dominators, judged
    against what feeds the whole attention, give the same layer input."""
    found = _dominating_use(attn, attn, idom, live)
    value = attn.args[2] if len(attn.args) > 2 else None
    if found is None and _LAYER_INPUT_THROUGH_VALUE and isinstance(value, fx.Node):
        found = _dominating_use(value, attn, idom, live)
    return found


def _dominating_use(start: fx.Node, attn: fx.Node, idom: dict, live: set) -> fx.Node | None:
    """Up the dominator chain of ``start``: the first value with a live use outside what feeds ``attn``."""
    feeding = _ancestors(attn)
    d = idom.get(start)
    while d is not None:
        outside = [u for u in d.users if u in live and u is not attn and u not in feeding]
        if outside and isinstance(d.meta.get("val"), torch.Tensor):
            while _is_view(d) and isinstance(d.args[0], fx.Node):
                d = d.args[0]
            return d
        d = idom.get(d)
    return None


def _dropout_p(node: fx.Node) -> float | None:
    """The ``dropout_p`` argument of an ATen SDPA node (seeded only for its dropout), else None."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    for i, arg in enumerate(schema.arguments):
        if arg.name == "dropout_p":
            value = node.kwargs.get("dropout_p", node.args[i] if i < len(node.args) else arg.default_value)
            return float(value) if isinstance(value, (int, float)) else None
    return None


def _never_tag(node: fx.Node) -> bool:
    """Ops whose recomputation would be wrong (RNG) or costly in a way the tags cannot see
    (communication), and non-ops."""
    if node.op != "call_function":
        return True
    target = node.target
    if target is operator.getitem and isinstance(node.args[0], fx.Node) and node.args[0].op == "call_function" \
            and _never_tag(node.args[0]):
        return True        # a part of a communicating op's result: recomputing it would rerun the op
    tags = getattr(target, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags and _dropout_p(node) != 0.0:
        return True
    namespace = getattr(target, "namespace", "")
    if namespace in ("_c10d_functional", "c10d_functional", "c10d"):
        return True
    # seqpar's shard/gather ops: gather communicates; leave both to the partitioner
    return namespace == "seqpar" and target not in _recomputable_seqpar_ops()


def _recomputable_seqpar_ops() -> set:
    ops = {torch.ops.seqpar.ring_attention.default, torch.ops.seqpar.ulysses_attention.default}
    if hasattr(torch.ops.seqpar, "blockwise_ffn"):
        ops.add(torch.ops.seqpar.blockwise_ffn.default)
    return ops


def tag_joint_graph(joint: fx.GraphModule, policy: str, model_state: Sequence[int]) -> CheckpointPlan:
    """Tag the forward nodes of an aot_autograd joint graph for ``policy``.

    Args:
        joint: the joint graph (placeholders ``primals_*`` then ``tangents_*``).
        policy: one of ``POLICIES``.
        model_state: indices of the primals that are parameters or buffers (not part of the
            activation flow the layer inputs are found in).
    Returns:
        The plan; ``plan.skipped`` says why nothing was tagged (the partitioner then runs as
        with ``none``).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown checkpoint policy {policy!r}; allowed: {', '.join(POLICIES)}")
    plan = CheckpointPlan(policy)
    tag_user_regions(joint, policy)
    if policy == "none":
        return plan
    forward = _forward_nodes(joint.graph)
    primals = [n for n in forward if n.op == "placeholder"]
    ops = attention_ops()
    plan.attention = [n for n in forward if n.target in ops]
    if not plan.attention:
        plan.skipped = "no attention op in the graph"
        return plan
    state = set(model_state)
    if state and max(state) >= len(primals):
        plan.skipped = f"model-state input {max(state)} out of range of the joint graph's {len(primals)} primals"
        return plan
    sources = {n for i, n in enumerate(primals) if i not in state}
    idom = _dominators(forward, sources)
    forward_set = set(forward)
    output = next(n for n in joint.graph.nodes if n.op == "output")
    live = set()
    for out in output.all_input_nodes:
        if out in forward_set:
            live |= _ancestors(out) | {out}
    layer_inputs = []
    for attn in plan.attention:
        x = _layer_input(attn, idom, live)
        if x is None and not _ancestors(attn) & set(plan.attention):
            continue        # the first attention, fed by graph inputs alone (a one-layer frame): they are its input
        if x is None:
            plan.skipped = f"no layer input found for {attn.name} (is every parameter a graph input?)"
            return plan
        if x.op != "placeholder" and x not in layer_inputs:
            layer_inputs.append(x)
    plan.layer_inputs = layer_inputs
    keep = set(layer_inputs)
    if policy == "remat-aware":
        keep |= set(plan.attention)
        keep |= {u for a in plan.attention for u in a.users}          # getitems: out, lse
    for node in forward:
        if _never_tag(node) or (policy == "remat-aware" and "ac_graph_id" in node.meta and node not in keep):
            continue            # remat-aware inside the user's checkpoint: the user's tags, attention saved
        if node in keep:
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        else:
            node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            plan.recomputed += 1
    return plan


def has_user_regions(gm: fx.GraphModule) -> bool:
    """The graph holds ops of a user's ``torch.utils.checkpoint`` region (``passes/hop_bodies.py``
    inlined it): the partitioner must run the region policy even under ``none``."""
    return any("ac_graph_id" in n.meta for n in gm.graph.nodes)


def checkpoint_partition_fn(policy: str, model_state: Sequence[int], compiler: str = "inductor") -> Callable:
    """A ``partition_fn`` for aot_autograd: tag the joint graph, then torch's min-cut partitioner.

    ``model_state`` indexes the graph inputs that are parameters or buffers (known at the
    Dynamo graph, where they are still ``nn.Parameter``s; the joint graph only numbers them).
    """
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def partition(joint: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any):
        plan = tag_joint_graph(joint, policy, model_state)
        if plan.skipped and plan.attention:
            log.warning("seqpar: checkpoint=%s not applied to this graph (%s); default partitioner",
                        policy, plan.skipped)
        elif plan.skipped:         # no attention (an MLP, a loss-only frame): nothing to decide
            log.info("seqpar: checkpoint=%s: %s; default partitioner", policy, plan.skipped)
        else:
            log.info("seqpar: checkpoint=%s: %d attention op(s), %d layer input(s) saved, %d op(s) recomputed",
                     policy, len(plan.attention), len(plan.layer_inputs), plan.recomputed)
        kwargs.setdefault("compiler", compiler)
        return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
    partition.policy = policy
    return partition


def _custom_partitioner_base():
    from torch._inductor.custom_graph_pass import CustomPartitionerFn
    return CustomPartitionerFn


class SeqparPartitioner(_custom_partitioner_base()):
    """The same policy as an inductor ``custom_partitioner_fn``: ``compile_fx``'s own joint-graph
    passes still run first. Module-level and plain so inductor can pickle it into its FX-graph
    cache key; ``uuid`` keys the cache on the policy and this file's contents."""

    def __init__(self, policy: str, model_state: Sequence[int]):
        self.policy, self.model_state = policy, tuple(model_state)

    def __call__(self, gm, joint_inputs, **kwargs):
        return checkpoint_partition_fn(self.policy, self.model_state)(gm, joint_inputs, **kwargs)

    def uuid(self):
        from torch._inductor.custom_graph_pass import get_hash_for_files
        return (get_hash_for_files((__file__,)), self.policy, self.model_state)


def inductor_partitioner(policy: str, model_state: Sequence[int]) -> SeqparPartitioner:
    return SeqparPartitioner(policy, model_state)
