"""Max and min over the sequence (max-pooling a sequence, ``amax`` of scores): a local reduction
and an all-reduce MAX / MIN, with eager's gradient exactly.

The value is easy (max of the ranks' maxima); the gradient is what needs care, because eager's
two kinds of max differentiate differently, and seqpar must match each:
  * ``amax`` / ``amin`` and ``max()`` / ``min()`` over all dims spread the gradient evenly over
    every position that ties for the extreme. Here each rank marks its ties, the tie count is
    all-reduced, and the value is rebuilt as ``all_reduce_sum(sum(x at ties) / count)``, whose
    backward (identity, docs/architecture.md) gives each tie ``grad / count`` on the rank that holds it.
  * ``max(dim)`` / ``min(dim)`` (and ``argmax`` / ``argmin``, the index alone) return the first
    index that attains the extreme and send the whole gradient there. Here the winner is the smallest global position among the ties (an
    all-reduce MIN over the positions the layout gives this rank's rows, ``runtime/layout.py``);
    the value is ``all_reduce_sum(x at the winner, 0 elsewhere)`` (exactly one non-zero term, so
    the forward is bitwise the maximum) and the returned index is that global position.
The extremes and positions are all-reduced on detached values with the functional collectives
(no autograd through them: torch's all-reduce would differentiate to another all-reduce).

Shapes: x [.., S_local (dim d), ..]; reductions keep dims until the end. Plain shards only (a
sequence dim merged with batch falls back, warned and exact). NaN inputs are not propagated as
eager does (a NaN maximum marks no tie).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from seqpar_compiler.runtime.grad_collectives import all_reduce_to_replicated

from .aten_rules import decomposed_rule
from .placement import Replicate
from .rewrite import call_arguments

__all__ = ["extreme_rule", "EXTREME_KEYS"]

_c10d = torch.ops._c10d_functional
EXTREME_KEYS = [torch.max, torch.min, torch.amax, torch.amin, torch.argmax, torch.argmin,
                ("method", "max"), ("method", "min"), ("method", "amax"), ("method", "amin"),
                ("method", "argmax"), ("method", "argmin")]


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else node.target.__name__


def _all_reduce(ctx, value: fx.Node, op: str) -> fx.Node:
    ctx.collectives.append(f"all-reduce {op} {value.name}")
    return ctx.emit(_c10d.wait_tensor.default, (ctx.emit(_c10d.all_reduce.default, (value, op, ctx.group_name)),))


def extreme_rule(ctx, node: fx.Node):
    """Rule for max / min / amax / amin / argmax / argmin: over the sequence dim as in the module
    docstring (argmax is max(dim)'s index); over other dims DTensor's rule (``aten_rules``);
    ``torch.max(a, b)`` is pointwise."""
    name = _name(node)
    arg = name in ("argmax", "argmin")                         # max(dim)'s index alone
    base = name[3:] if arg else name[1:] if name.startswith("a") else name          # "max" or "min"
    names = ["input", "dim", "keepdim"]
    a = call_arguments(node, names, {"dim": None, "keepdim": False})
    if isinstance(a["dim"], fx.Node) or "other" in node.kwargs:
        from .sharding_rules import RULES
        return RULES[torch.mul](ctx, node)                     # maximum(a, b): the pointwise rule
    x = a["input"]
    pl = ctx.shard_of(x)
    ex = ctx.example(x)
    nd = ex.dim()
    dims = a["dim"]
    if arg and (dims is None or isinstance(dims, (list, tuple))):
        return decomposed_rule(ctx, node)          # argmax of the flattened tensor: its flat index
    by_index = (arg or not name.startswith("a")) and dims is not None and not isinstance(dims, (list, tuple))
    dims = list(range(nd)) if dims is None or dims == [] or dims == () else (
        [dims] if isinstance(dims, int) else list(dims))
    dims = sorted(d % nd for d in dims)
    if pl is None or pl.dim not in dims:
        return decomposed_rule(ctx, node)
    if not pl.plain:
        return f"{name} over a sequence dim merged with another dim"
    xl = ctx.env[x]
    det = ctx.emit("detach", (xl,), op="call_method")
    local = ctx.emit(getattr(torch, "a" + base), (det, dims, True))
    extreme = _all_reduce(ctx, local, base)
    ties = ctx.emit(operator.eq, (det, extreme))
    if by_index:
        return _first_index(ctx, node, xl, ties, pl.dim, a["keepdim"], ex, values=not arg)
    count = _all_reduce(ctx, ctx.emit(torch.sum, (ties,), {"dim": dims, "keepdim": True}), "sum")
    picked = ctx.emit("masked_fill", (xl, ctx.emit(torch.logical_not, (ties,)), 0), op="call_method")
    part = ctx.emit(torch.sum, (picked,), {"dim": dims, "keepdim": True})
    part = ctx.emit(operator.truediv, (part, count))
    out = ctx.emit(all_reduce_to_replicated, (part, ctx.group_name))
    shape = list(ctx.example(node).shape)
    out = ctx.emit("reshape", (out, shape), op="call_method", placement=Replicate())
    return out, Replicate()


def _first_index(ctx, node, xl, ties, d: int, keepdim: bool, ex, values: bool = True):
    """(values, indices) of max(dim) / min(dim): the first global position among the ties; the
    index alone for argmax / argmin."""
    S_local = ex.shape[d] // ctx.P
    pos = ctx.constant("positions", ctx.positions(ex.device, torch.long))
    view = [1] * ex.dim()
    view[d] = S_local
    pos = ctx.emit("view", (pos, view), op="call_method")
    cand = ctx.emit(torch.where, (ties, pos, ctx.S))
    winner = _all_reduce(ctx, ctx.emit(torch.amin, (cand, [d], True)), "min")
    if not values:
        if not keepdim:
            winner = ctx.emit("squeeze", (winner, d), op="call_method")
        return winner, Replicate()
    win = ctx.emit(operator.eq, (pos, winner))
    picked = ctx.emit("masked_fill", (xl, ctx.emit(torch.logical_not, (win,)), 0), op="call_method")
    values = ctx.emit(all_reduce_to_replicated, (ctx.emit(torch.sum, (picked,), {"dim": [d], "keepdim": True}),
                                                 ctx.group_name))
    if not keepdim:
        values = ctx.emit("squeeze", (values, d), op="call_method")
        winner = ctx.emit("squeeze", (winner, d), op="call_method")
    pls = (Replicate(), Replicate())
    return ctx.emit(tuple, ([values, winner],), placement=pls), pls
