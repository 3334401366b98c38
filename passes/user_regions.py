"""The user's checkpoint regions in the joint graph: their policy, with seqpar's ops in mind.

``hop_bodies.py`` inlined each ``torch.utils.checkpoint`` body with torch's own tags
(``meta["recompute"] = PREFER_RECOMPUTE``, ``meta["ac_graph_id"]``); aot_autograd copied them
onto the ATen nodes of the joint graph. This module settles those tags before the min-cut
partitioner reads them:

  * a selective-checkpoint region (``checkpoint(fn, x, context_fn=...)``) gets the user's
    policy evaluated per ATen op, as torch's ``_CachingTorchDispatchMode`` would have. The ring
    op replaces an SDPA op the policy may name (``aten._scaled_dot_product_*``): when the policy
    does not answer "save" for the ring op itself, it is asked about each SDPA overload, and
    "save" for any of them saves the ring's (out, lse);
  * collectives seqpar inserted inside a region are never recomputed (a recomputed all-gather is
    communication the user did not ask for): MUST_SAVE;
  * ``SEQPAR_CHECKPOINT=remat-aware``: attention's (out, lse) inside the region are saved, so its
    forward runs once per layer-step; the user's tags stay on everything else. ``none`` leaves the
    user's choice alone (attention inside is recomputed: two forwards).

Reads: ``meta["ac_graph_id"]``, ``meta["val"]`` of the joint graph's forward nodes and
``hop_bodies.USER_POLICIES``. Writes: ``meta["recompute"]`` on those nodes.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy, SelectiveCheckpointContext

from .hop_bodies import USER_POLICIES

__all__ = ["tag_user_regions"]

_SAVE = (CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE)
_SDPA_NAMES = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
               "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")


def _sdpa_overloads() -> list:
    aten = torch.ops.aten
    return [getattr(aten, n).default for n in _SDPA_NAMES if hasattr(aten, n)]


def _ring_ops() -> set:
    import seqpar_compiler.runtime  # noqa: F401 - registers the seqpar ops
    ops = {torch.ops.seqpar.ring_attention.default}
    if hasattr(torch.ops.seqpar, "ulysses_attention"):
        ops.add(torch.ops.seqpar.ulysses_attention.default)
    return ops


def _is_collective(node: fx.Node) -> bool:
    target = node.target
    if getattr(target, "namespace", "") in ("_c10d_functional", "c10d_functional", "c10d"):
        return True
    return target is torch.ops.seqpar.gather_sequence.default


def _policy_fns(region: int) -> object:
    """The user's policy function of a region (``context_fn()``'s forward mode holds it)."""
    context_fn = USER_POLICIES.get(region)
    if context_fn is None:
        return None
    fwd_ctx, _ = context_fn()
    return getattr(fwd_ctx, "policy_fn", None)


def _as_policy(answer) -> CheckpointPolicy:
    if isinstance(answer, bool):          # torch accepts a bool: True means save
        return CheckpointPolicy.MUST_SAVE if answer else CheckpointPolicy.PREFER_RECOMPUTE
    return answer


def _ask(policy_fn, func, node: fx.Node) -> CheckpointPolicy:
    args = fx.node.map_arg(node.args, lambda a: a.meta.get("val"))
    kwargs = fx.node.map_arg(node.kwargs, lambda a: a.meta.get("val"))
    return _as_policy(policy_fn(SelectiveCheckpointContext(is_recompute=False), func, *args, **kwargs))


def _user_policy(policy_fn, node: fx.Node, ring_ops: set) -> CheckpointPolicy:
    answer = _ask(policy_fn, node.target, node)
    if node.target in ring_ops and answer not in _SAVE:
        for sdpa in _sdpa_overloads():
            other = _ask(policy_fn, sdpa, node)
            if other in _SAVE:
                return other
    return answer


def tag_user_regions(joint: fx.GraphModule, policy: str) -> int:
    """Settle the tags of the user's checkpoint regions of a joint graph; returns how many
    forward nodes are in one. ``policy`` is ``SEQPAR_CHECKPOINT``."""
    from .checkpointing import _forward_nodes, attention_ops
    forward = [n for n in _forward_nodes(joint.graph) if "ac_graph_id" in n.meta]
    if not forward:
        return 0
    ring_ops, attention = _ring_ops(), attention_ops() | _ring_ops()
    policies: dict = {}
    for node in forward:
        region = node.meta["ac_graph_id"]
        if region not in policies:
            policies[region] = _policy_fns(region)
        fn = policies[region]
        if node.op != "call_function":
            continue
        if fn is not None and isinstance(node.target, torch._ops.OpOverload):
            node.meta["recompute"] = _user_policy(fn, node, ring_ops)
        if _is_collective(node):
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    for node in forward:                        # outputs of an op follow the op (getitem)
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and "recompute" in node.args[0].meta:
            node.meta["recompute"] = node.args[0].meta["recompute"]
    if policy == "remat-aware":
        for node in forward:
            if node.target in attention:
                node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
                for user in node.users:
                    user.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    return len(forward)
