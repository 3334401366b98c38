"""The sharding rule of a user's elementwise ``torch.autograd.Function`` (BLOOM's GELU).

Dynamo captures ``Function.apply`` as one ``autograd_function_apply(fwd_body, bwd_body, *args)``
node whose bodies are graph modules: the ATen-level generic rule cannot look inside (its inputs
are not all tensors), so the whole sequence was gathered for it. When every op of both bodies is
elementwise (aten's ``pointwise`` tag, or a cast) over tensors of one shape, the function's value
and its hand-written gradient at a position depend on that position's inputs only: the node runs
as it is on each rank's shard, its saved tensors are shards, and its backward body runs on the
shard of the gradient. Exact by construction; anything else (a reduction, a factory, a buffer in
a body, inputs of different shapes or placements) is refused and gathered, warned.

Reads the node's bodies (``get_attr`` graph modules) and its inputs' placements; writes the
node, with local arguments, into the new graph.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .placement import Shard

__all__ = ["autograd_function_rule", "AUTOGRAD_FUNCTION_APPLY"]

AUTOGRAD_FUNCTION_APPLY = getattr(torch.ops.higher_order, "autograd_function_apply", None)

# calls a body may make besides elementwise math: autograd mode switches Dynamo writes around it
_NEUTRAL = {torch._C._set_grad_enabled}


def _body(node: fx.Node) -> fx.GraphModule | None:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    root = node.graph.owning_module
    body = getattr(root, node.target, None) if root is not None else None
    return body if isinstance(body, fx.GraphModule) else None


def _elementwise(body: fx.GraphModule) -> str | None:
    """None when every call of ``body`` is elementwise, else what is not."""
    from .sharding_rules import POINTWISE_FUNCTIONS, POINTWISE_METHODS, _aten_pointwise
    for n in body.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        if n.op == "get_attr":
            return f"a constant {n.target} in its body"
        if n.op == "call_function" and n.target in _NEUTRAL:
            continue
        known = (n.target in POINTWISE_FUNCTIONS if n.op == "call_function" else
                 n.target in POINTWISE_METHODS if n.op == "call_method" else False)
        if not (known or _aten_pointwise(n)) or n.target is torch.nn.functional.dropout:
            return f"{getattr(n.target, '__name__', n.target)} in its body (not elementwise)"
    return None


def autograd_function_rule(ctx, node: fx.Node):
    """``autograd_function_apply(fwd, bwd, *tensors)`` on local shards when both bodies are
    elementwise and every tensor input is sharded alike (module docstring)."""
    fwd, bwd, *args = node.args
    bodies = [_body(fwd), _body(bwd)]
    if any(b is None for b in bodies):
        return "an autograd.Function whose bodies are not graph modules"
    for b in bodies:
        why = _elementwise(b)
        if why is not None:
            return f"an autograd.Function with {why}"
    shapes = {tuple(ctx.example(a).shape) for a in args if isinstance(a, fx.Node)}
    places = {ctx.placement_of(a) for a in args if isinstance(a, fx.Node)}
    if (len(shapes) != 1 or len(places) != 1 or not isinstance(next(iter(places)), Shard)
            or any(not isinstance(a, fx.Node) for a in args)):
        return "an autograd.Function whose inputs are not tensors of one shape sharded alike"
    place = next(iter(places))
    out = ctx.example(node)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    if any(tuple(o.shape) not in shapes for o in (out if isinstance(out, (tuple, list)) else [out])):
        return "an autograd.Function whose outputs are not shaped like its inputs"
    new = ctx.emit(node.target, (ctx.env[fwd], ctx.env[bwd], *(ctx.env[a] for a in args)), dict(node.kwargs),
                   placement=(place,) * n_out)
    return new, (place,) * n_out
