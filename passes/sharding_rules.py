"""Sharding rules: for one op whose inputs are (partly) sharded, emit the local op and say where
the sequence is in its output. A rule returns ``(new node, placement)``, or a string saying why it
cannot shard this use (the caller then falls back to gathering).

How to add a rule: write ``def _rule(ctx, node)`` using ``ctx.env`` / ``ctx.local`` /
``ctx.weight`` / ``ctx.full`` to build arguments, and register it under the op's key
(``("method", name)`` for ``Tensor.name`` calls, else the function) in ``RULES``. Pointwise ops
need no entry: an op whose aten overloads carry ``torch.Tag.pointwise`` (DTensor's source for its
pointwise rules) gets the pointwise rule (``rule_for``). Views, indexing, splits and cat live in
``view_rules.py``, max/min over the sequence in ``extreme_rules.py``, rules on parts of the
sequence in ``range_rules.py``.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from seqpar_compiler.runtime.grad_collectives import all_reduce_to_replicated
from seqpar_compiler.runtime.rank_dropout import rank_dropout_op  # noqa: F401  (registers the op)

from .attention_patterns import canonical_attention
from .attention_rules import canonical_attention_rule, sdpa_rule
from .aten_rules import decomposed_rule
from .autograd_function_rule import AUTOGRAD_FUNCTION_APPLY, autograd_function_rule
from .placement import Replicate, Shard
from .extreme_rules import EXTREME_KEYS, extreme_rule
from .range_rules import dispatch
from .recurrences import carried_recurrence, recurrence_rule
from .view_rules import FINAL_VIEW_RULES, GETITEM_RULE, REUSABLE_VIEW_RULES, SPLIT_RULES, VIEW_RULES
from .view_rules import norm_dim as _norm_dim
from .rewrite import call_arguments

__all__ = ["RULES", "SEEDING_RULES", "rule_key", "rule_for", "is_sequence_arange"]


def rule_key(node: fx.Node):
    return ("method", node.target) if node.op == "call_method" else node.target


def _tensor_nodes(value) -> list[fx.Node]:
    found = []
    fx.node.map_arg(value, found.append)
    return found


# -- dropout -----------------------------------------------------------------------------------
def _dropout(ctx, node):
    """``F.dropout`` / ``torch.dropout`` of a shard: a mask drawn per rank
    (``runtime/rank_dropout.py``: the plain op would draw one mask on every rank for different
    tokens). Off (eval, p = 0) it is the identity, as pointwise. In place, or with a probability
    only known at run time, it is refused: the generic rule then refuses the random ATen op and
    the value is computed whole (one device's mask, bitwise)."""
    names = ["input", "p", "training", "inplace"] if node.target is F.dropout else ["input", "p", "train"]
    a = call_arguments(node, names, {"p": 0.5, "training": True, "train": True, "inplace": False})
    training = a.get("training", a.get("train"))
    if not isinstance(a["p"], (int, float)) or not isinstance(training, bool):
        return "dropout with a probability or mode known only at run time"
    if not training or a["p"] == 0:
        return _pointwise(ctx, node)
    if a.get("inplace"):
        return "dropout in place"
    pl = ctx.shard_of(a["input"])
    if pl is None or not isinstance(ctx.example(a["input"]), torch.Tensor):
        return "dropout whose input is not a shard"
    pair = ctx.emit(torch.ops.seqpar.rank_dropout.default, (ctx.env[a["input"]], float(a["p"]), ctx.group_name),
                    placement=(pl, pl))
    return ctx.emit(operator.getitem, (pair, 0), placement=pl), pl


# -- pointwise ---------------------------------------------------------------------------------
def _pointwise(ctx, node):
    out = ctx.example(node)
    if not isinstance(out, torch.Tensor):
        return "non-tensor result"
    target = None
    for a in _tensor_nodes((node.args, node.kwargs)):
        pl = ctx.shard_of(a)
        if pl is None:
            continue
        d = pl.dim + out.dim() - ctx.example(a).dim()
        cand = Shard(d, pl.pre, pl.post)
        if target is not None and cand != target:
            return f"operands sharded differently ({target} vs {cand})"
        target = cand
    full = target.pre * ctx.S * target.post

    def operand(a):
        if ctx.shard_of(a) is not None:
            return ctx.env[a]
        ex = ctx.example(a)
        if not isinstance(ex, torch.Tensor):
            return ctx.env[a]
        ad = target.dim - (out.dim() - ex.dim())
        if ad < 0 or ex.shape[ad] == 1:
            return ctx.weight(a)
        if ex.shape[ad] == full and target.plain:
            return ctx.local(a, ad)
        raise _NoRule(f"a replicated operand of size {ex.shape[ad]} meets the sequence dim")
    try:
        args = fx.node.map_arg(node.args, operand)
        kwargs = fx.node.map_arg(node.kwargs, operand)
    except _NoRule as e:
        return str(e)
    return ctx.emit(node.target, args, kwargs, target, op=node.op), target


class _NoRule(Exception):
    pass


# -- matmul-like ops that keep the token dims ---------------------------------------------------
def _linear(ctx, node):
    a = call_arguments(node, ["input", "weight", "bias"], {"bias": None})
    x = ctx.shard_of(a["input"])
    if x is None or ctx.shard_of(a["weight"]) or x.dim == ctx.example(a["input"]).dim() - 1:
        return "only the input of a linear may be sharded, not along its feature dim"
    new = ctx.emit(F.linear, (ctx.env[a["input"]], ctx.weight(a["weight"]), ctx.weight(a["bias"])), placement=x)
    return new, x


def _addmm(ctx, node):
    """addmm(bias, x, w) as in GPT-2's Conv1D: rows of x are tokens (often batch×sequence merged)."""
    bias, x, w = node.args[:3]
    pl = ctx.shard_of(x)
    if pl is None or pl.dim != 0 or ctx.shard_of(bias) or ctx.shard_of(w):
        return "addmm with sharded weights or bias"
    new = ctx.emit(node.target, (ctx.weight(bias), ctx.env[x], ctx.weight(w)), node.kwargs, pl)
    return new, pl


def _matmul(ctx, node):
    """x @ W with tokens in x's leading dims and a replicated W (a projection)."""
    x, w = node.args[:2]
    pl = ctx.shard_of(x)
    if pl is None or ctx.shard_of(w) or ctx.example(w).dim() != 2 or pl.dim >= ctx.example(x).dim() - 1:
        return "a matmul that mixes the sequence (e.g. hand-written attention)"
    return ctx.emit(node.target, (ctx.env[x], ctx.weight(w)), node.kwargs, pl, op=node.op), pl


def _embedding(ctx, node):
    idx = ctx.shard_of(node.args[0])
    if idx is None or ctx.shard_of(node.args[1]):
        return "the embedding table itself is sharded"
    args = (ctx.env[node.args[0]], ctx.weight(node.args[1]), *node.args[2:])
    return ctx.emit(node.target, args, node.kwargs, idx), idx


def _layer_norm(ctx, node):
    a = call_arguments(node, ["input", "normalized_shape", "weight", "bias", "eps"], {"weight": None, "bias": None, "eps": 1e-5})
    x = ctx.shard_of(a["input"])
    nd = ctx.example(a["input"]).dim()
    shape = a["normalized_shape"]
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    if x is None or x.dim >= nd - k:
        return "layer norm over the sequence dim"
    new = ctx.emit(F.layer_norm, (ctx.env[a["input"]], shape, ctx.weight(a["weight"]), ctx.weight(a["bias"]),
                                  a["eps"]), placement=x)
    return new, x


def _outer(ctx, node):
    a, b = node.args[:2]
    if ctx.shard_of(a) and not ctx.shard_of(b):
        pl = Shard(0)
    elif ctx.shard_of(b) and not ctx.shard_of(a):
        pl = Shard(1)
    else:
        return "both factors sharded"
    return ctx.emit(node.target, (ctx.env[a] if pl.dim == 0 else ctx.weight(a),
                                  ctx.env[b] if pl.dim == 1 else ctx.weight(b)), placement=pl), pl


# -- reductions ------------------------------------------------------------------------------------
def _reduction(ctx, node):
    """sum / mean: over other dims stays local; over the sequence becomes local + all-reduce."""
    x = ctx.shard_of(node.args[0])
    nd = ctx.example(node.args[0]).dim()
    a = call_arguments(node, ["input", "dim", "keepdim"], {"dim": None, "keepdim": False})
    dims = a["dim"]
    dims = list(range(nd)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(_norm_dim(d, nd) for d in dims)
    kind = node.target if isinstance(node.target, str) else node.target.__name__
    if x.dim not in dims:
        d = x.dim if a["keepdim"] else x.dim - sum(1 for r in dims if r < x.dim)
        pl = Shard(d, x.pre, x.post)
        return ctx.emit(node.target, (ctx.env[node.args[0]],), {"dim": dims, "keepdim": a["keepdim"]},
                        pl, op=node.op), pl
    ex = ctx.example(node.args[0])
    local = ctx.emit(torch.sum, (ctx.env[node.args[0]],), {"dim": dims, "keepdim": a["keepdim"]})
    ctx.collectives.append(f"all-reduce {node.name}")
    total = ctx.emit(all_reduce_to_replicated, (local, ctx.group_name), placement=Replicate())
    if kind == "mean":
        count = 1
        for r in dims:
            count *= ex.shape[r]
        total = ctx.emit(operator.truediv, (total, count), placement=Replicate())
    return total, Replicate()


def _cross_entropy(ctx, node):
    """Cross entropy over tokens sharded along any dim but the class dim (``[N, V]`` logits,
    or ``[B, V, S]`` with the classes in dim 1); ``reduction="mean"`` divides the global sum by
    the global count of targets that are not ignored (label smoothing keeps that divisor)."""
    a = call_arguments(node, ["input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction",
                     "label_smoothing"], {"weight": None, "ignore_index": -100, "reduction": "mean",
                                          "label_smoothing": 0.0, "size_average": None, "reduce": None})
    x, t = ctx.shard_of(a["input"]), ctx.shard_of(a["target"])
    if x is None or x.dim == 1 or ctx.example(a["input"]).dim() < 2:
        return "cross entropy sharded along its class dim"
    td = 0 if x.dim == 0 else x.dim - 1
    tgt_ex = ctx.example(a["target"])
    if t is None and tgt_ex.dim() == ctx.example(a["input"]).dim() - 1 and tgt_ex.shape[td] == x.pre * ctx.S * x.post:
        t = Shard(td, x.pre, x.post)     # replicated targets (shifted labels): sliced like the logits
    if (t is None or t.dim != td or (x.pre, x.post) != (t.pre, t.post) or a["weight"] is not None
            or a["size_average"] is not None or a["reduce"] is not None or tgt_ex.is_floating_point()):
        return "cross entropy in a form without a rule (class-index targets sharded like the logits, no weight)"
    inp, tgt = ctx.env[a["input"]], ctx.local(a["target"], td, t.pre, t.post)
    opts = {"ignore_index": a["ignore_index"], "label_smoothing": a["label_smoothing"]}
    if a["reduction"] == "none":
        pl = Shard(td, x.pre, x.post)
        return ctx.emit(F.cross_entropy, (inp, tgt), {**opts, "reduction": "none"}, pl), pl
    local = ctx.emit(F.cross_entropy, (inp, tgt), {**opts, "reduction": "sum"})
    ctx.collectives.append(f"all-reduce {node.name}")
    if a["reduction"] == "sum":
        return ctx.emit(all_reduce_to_replicated, (local, ctx.group_name), placement=Replicate()), Replicate()
    # mean over the targets that are not ignored, counted over the whole sequence
    valid = ctx.emit(operator.ne, (tgt, a["ignore_index"]))
    count = ctx.emit("sum", (valid,), op="call_method")
    count = ctx.emit("to", (count, ctx.example(node).dtype), op="call_method")
    both = ctx.emit(torch.stack, ([local, count],))
    both = ctx.emit(all_reduce_to_replicated, (both, ctx.group_name))
    loss_sum = ctx.emit(operator.getitem, (both, 0))
    n = ctx.emit(operator.getitem, (both, 1))
    return ctx.emit(operator.truediv, (loss_sum, n), placement=Replicate()), Replicate()


def _new_like_shard(ctx, node):
    """``x.new_empty(size)`` / ``new_zeros`` / ``new_ones`` / ``new_full`` shaped like the shard
    ``x`` (its sequence dim at full length): a fresh buffer of this rank's rows, filled like the
    whole one (DeepSeek-V3 assembles K in one by copies into its halves). Sharding a buffer is a
    guess about how it is written: the rewrite's alias check computes it whole when a write into
    it cannot stay on the shard."""
    x = ctx.shard_of(node.args[0])
    ex = ctx.example(node)
    size = list(ex.shape)
    if x is None or len(size) != ctx.example(node.args[0]).dim() or size[x.dim] != x.pre * ctx.S * x.post:
        return "a buffer that is not shaped like the shard it is made from"
    size[x.dim] //= ctx.P
    fill = ((node.args[2] if len(node.args) > 2 else node.kwargs["fill_value"]),) if node.target == "new_full" else ()
    kwargs = {k: v for k, v in node.kwargs.items() if k not in ("size", "fill_value")}
    return ctx.emit(node.target, (ctx.env[node.args[0]], size, *fill), kwargs, x, op="call_method"), x


def is_sequence_arange(ctx, node) -> bool:
    if node.target is not torch.arange:
        return False
    ex = ctx.example(node)
    if not (isinstance(ex, torch.Tensor) and ex.dim() == 1 and ex.shape[0] == ctx.S):
        return False
    args = list(node.args)
    return args in ([ctx.S], [0, ctx.S], [0, ctx.S, 1]) and not node.kwargs.get("requires_grad", False)


def _arange(ctx, node):
    if not is_sequence_arange(ctx, node):
        return "arange that is not 0..S"
    ex = ctx.example(node)
    return ctx.constant("positions", ctx.positions(ex.device, ex.dtype)), Shard(0)


POINTWISE_FUNCTIONS = [operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
                       torch.add, torch.sub, torch.mul, torch.div, torch.rsqrt, torch.exp, torch.tanh,
                       torch.sigmoid, torch.sin, torch.cos, torch.sqrt, torch.neg, torch.pow, torch.where,
                       F.gelu, F.silu, F.relu, torch.nn.functional.tanh, F.logsigmoid]
POINTWISE_METHODS = ["add", "sub", "mul", "div", "neg", "pow", "rsqrt", "exp", "tanh", "sigmoid", "sin", "cos",
                     "sqrt", "float", "half", "bfloat16", "to", "type", "type_as", "contiguous", "clone", "relu",
                     "detach", "__add__", "__mul__", "__radd__", "__rmul__", "masked_fill"]

_OPERATOR_ATEN_NAMES = {"and_": "bitwise_and", "or_": "bitwise_or", "xor": "bitwise_xor", "invert": "bitwise_not",
                        "truediv": "div", "floordiv": "floor_divide", "mod": "remainder"}
_TORCH_NAMESPACES = ("torch", "torch.nn.functional", "torch._C._nn", "torch.special", "_operator", "operator")


def _aten_pointwise(node: fx.Node) -> bool:
    """True if the aten op of this torch-level call is tagged ``pointwise`` — the tag DTensor's
    own pointwise sharding rules are built from (``_get_pointwise_ops_from_tag``), so any op
    DTensor shards elementwise is sharded here the same way without being listed by hand.
    In-place and random (``nondeterministic_seeded``) ops are left to explicit rules."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function" and getattr(node.target, "__module__", None) in _TORCH_NAMESPACES:
        name = node.target.__name__
    else:
        return False
    name = _OPERATOR_ATEN_NAMES.get(name, name)
    if not isinstance(name, str) or (name.endswith("_") and not name.endswith("__")):
        return False
    packet = getattr(torch.ops.aten, name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return False
    overloads = [getattr(packet, o) for o in packet.overloads()]
    return (any(torch.Tag.pointwise in o.tags for o in overloads)
            and not any(torch.Tag.nondeterministic_seeded in o.tags for o in overloads))


_REUSABLE = set()      # rules whose emitted op does not depend on the local length (filled below)


def rule_for(node: fx.Node):
    """The rule of ``node`` (``_rule_for``), behind ``range_rules.dispatch``: a node that reads
    a part of the sequence (a chunk of a chunked loss) is handled there."""
    rule = _rule_for(node)
    hand = RULES.get(rule_key(node))
    kind = ("pointwise" if rule is _pointwise or hand is _pointwise else "getitem" if hand is GETITEM_RULE
            else "split" if hand in SPLIT_RULES else "reuse" if hand in _REUSABLE else None)
    return lambda ctx, n: dispatch(ctx, n, rule, kind, hand)


def _rule_for(node: fx.Node):
    """The sharding rule of ``node``: its entry in ``RULES``, else the pointwise rule when aten
    tags the op pointwise, else the generic rule (``aten_rules``: the op decomposed to ATen,
    each piece sharded by DTensor's strategy). A hand-written rule that refuses a use gets the
    generic rule as a second chance (``inv_freq @ position_ids`` is a matmul the projection
    rule refuses and DTensor's matmul strategy shards)."""
    rule = RULES.get(rule_key(node))
    if rule is None and _aten_pointwise(node):
        return _pointwise
    if rule is None:
        return decomposed_rule
    if rule in _FINAL_RULES:
        return rule
    return lambda ctx, n: _second_chance(rule, ctx, n)


def _second_chance(rule, ctx, node):
    result = rule(ctx, node)
    if not isinstance(result, str):
        return result
    generic = decomposed_rule(ctx, node)
    return result if isinstance(generic, str) or generic is None else generic


# Ops where a replicated user input carrying the sequence (input_ids, inputs_embeds) is sharded.
SEEDING_RULES = {F.embedding, F.linear, torch._C._nn.linear, F.layer_norm, torch.layer_norm, torch.addmm,
                 F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention, canonical_attention}

# rules whose refusal is about the layout (the sequence dim itself): DTensor must not overrule them
_FINAL_RULES = {*FINAL_VIEW_RULES, _arange, extreme_rule, _cross_entropy, canonical_attention_rule, sdpa_rule,
                recurrence_rule}
_REUSABLE.update({_linear, _addmm, _matmul, _embedding, _layer_norm, *REUSABLE_VIEW_RULES})

RULES = {
    **{f: _pointwise for f in POINTWISE_FUNCTIONS},
    **{("method", m): _pointwise for m in POINTWISE_METHODS},
    F.linear: _linear, torch._C._nn.linear: _linear,
    F.embedding: _embedding,
    torch.addmm: _addmm, torch.mm: _matmul, torch.matmul: _matmul, operator.matmul: _matmul,
    ("method", "matmul"): _matmul, ("method", "mm"): _matmul,
    F.layer_norm: _layer_norm, torch.layer_norm: _layer_norm,
    torch.outer: _outer,
    **VIEW_RULES,
    ("method", "mean"): _reduction, ("method", "sum"): _reduction, torch.mean: _reduction, torch.sum: _reduction,
    F.cross_entropy: _cross_entropy,
    F.scaled_dot_product_attention: sdpa_rule, torch._C._nn.scaled_dot_product_attention: sdpa_rule,
    torch.arange: _arange,
    **{("method", m): _new_like_shard for m in ("new_empty", "new_zeros", "new_ones", "new_full")},
    canonical_attention: canonical_attention_rule,
    **{k: extreme_rule for k in EXTREME_KEYS},
    carried_recurrence: recurrence_rule,
    F.dropout: _dropout, torch.dropout: _dropout,
}
if AUTOGRAD_FUNCTION_APPLY is not None:          # a user's elementwise autograd.Function (BLOOM's GELU)
    RULES[AUTOGRAD_FUNCTION_APPLY] = autograd_function_rule
    _FINAL_RULES.add(autograd_function_rule)
