"""The ways model code writes the two products of attention, normalised to [B, H, S, D] operands.

Reads Dynamo's ``node.meta["example_value"]``; may insert ``permute`` / ``view`` nodes (with
``example_value``) in front of an attention it matched, so the canonical node always sees
q [B, Hq, S, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] and returns [B, Hq, S, Dv].

Scores ``q kᵀ`` (before scale, soft-capping, biases and masks):
  * ``q @ k.transpose(-2, -1)`` or ``q @ k.mT`` (nanoGPT, Llama, most HF models; litgpt);
  * ``torch.einsum("bhid,bhjd->bhij", q, k)`` and any relabelling or operand layout, e.g.
    ``"bihd,bjhd->bhij"`` (x-transformers, einops code);
  * ``torch.baddbmm(zeros, q3, k3ᵀ, beta=·, alpha=scale).view(B, H, S, S)`` and ``torch.bmm``
    on [B·H, S, D] (GPT-NeoX, Bloom); ``alpha`` is the scale; a non-zero ``input`` with
    ``beta`` ≠ 0 is an additive score term (Bloom's ALiBi), returned for the caller to prove.
Output ``probs @ v``: ``matmul``, ``einsum("bhij,bhjd->bhid")`` (any relabelling / v or output
layout), or ``torch.bmm(probs.view(B·H, S, S), v3).view(B, H, S, Dv)`` on [B·H, S, Dv] (Bloom). K/V repeated for GQA (``x[:, :, None].expand(...).reshape(...)`` or
``repeat_interleave(n, dim=1)``) are folded away: the ring sends the small K/V.
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from .mask_proof import example, is_call

__all__ = ["ScoresForm", "ValueForm", "match_scores", "match_value_product", "unrepeat_kv", "peel_softcap",
           "emit", "to_bhsd"]

_MATMUL = {torch.matmul, operator.matmul}
_EINSUM = {torch.einsum, torch.functional.einsum}
_REPEAT_INTERLEAVE = {torch.repeat_interleave}


@dataclass
class ScoresForm:
    """``scale · q kᵀ`` with q/k in [B, H, S, D] once their ``perm`` (None: already) is applied.

    ``bias``: an additive score term found inside the product (baddbmm's ``input``), a node whose
    value is [B·H, S, S]-broadcastable, scaled by ``bias_beta``; None if there is none."""

    q: fx.Node
    k: fx.Node
    q_perm: tuple | None = None
    k_perm: tuple | None = None
    q_shape: tuple | None = None          # view [B·H, S, D] → [B, H, S, D] (bmm forms)
    k_shape: tuple | None = None
    scale: float = 1.0
    bias: fx.Node | None = None
    bias_beta: float = 1.0


@dataclass
class ValueForm:
    """``probs @ v`` with v [B, H, S, Dv] once viewed to ``v_shape`` (bmm form) and/or
    ``v_perm`` is applied; ``out_perm`` takes the canonical [B, H, S, Dv] result to the layout
    the model's product returned."""

    probs: fx.Node
    v: fx.Node
    v_perm: tuple | None = None
    out_perm: tuple | None = None
    v_shape: tuple | None = None          # view [B·H, S, Dv] → [B, H, S, Dv] (bmm form)


def _einsum_parts(node):
    """(equation without spaces, [operands]) of a two-operand einsum without ellipsis, else None."""
    if not is_call(node, fns=_EINSUM):
        return None
    eq, *ops = node.args
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or "..." in eq or len(ops) != 2 or not all(isinstance(o, fx.Node) for o in ops):
        return None
    eq = eq.replace(" ", "")
    ins, _, out = eq.partition("->")
    terms = ins.split(",")
    if len(terms) != 2 or not out or any(len(set(t)) != len(t) for t in (*terms, out)):
        return None
    return terms, out, ops


def _perm(have: str, want: str) -> tuple | None:
    """The permutation taking labels ``have`` to ``want`` (None for the identity)."""
    p = tuple(have.index(c) for c in want)
    return None if p == tuple(range(len(p))) else p


def _einsum_scores(node):
    parts = _einsum_parts(node)
    if parts is None:
        return None
    (a, b), out, (x, y) = parts
    if len(out) != 4 or len(a) != 4 or len(b) != 4:
        return None
    bb, h, i, j = out
    d = set(a) - set(out)
    if len(d) != 1 or set(b) - set(out) != d:
        return None
    d = d.pop()
    if i in a and j in b and j not in a and i not in b:
        q, ql, k, kl = x, a, y, b
    elif j in a and i in b and i not in a and j not in b:
        q, ql, k, kl = y, b, x, a
    else:
        return None
    if set(ql) != {bb, h, i, d} or set(kl) != {bb, h, j, d}:
        return None
    return ScoresForm(q, k, _perm(ql, bb + h + i + d), _perm(kl, bb + h + j + d))


def _is_transpose_last_two(node, rank: int) -> bool:
    """``x.transpose(-2, -1)`` (any spelling of the last two dims) or ``x.mT`` (litgpt)."""
    if is_call(node, fns={torch.transpose}, methods={"transpose"}):
        return sorted(d % rank for d in node.args[1:3]) == [rank - 2, rank - 1]
    return is_call(node, fns={getattr}) and node.args[1] == "mT"


def _bmm_scores(node):
    """``view(baddbmm(input, q3, k3ᵀ, beta, alpha) | bmm(q3, k3ᵀ), B, H, S, S)``."""
    if not is_call(node, methods={"view", "reshape"}):
        return None
    out = example(node)
    inner = node.args[0]
    if out is None or out.dim() != 4:
        return None
    B, H = out.shape[:2]
    beta, alpha, bias = 1.0, 1.0, None
    if is_call(inner, fns={torch.baddbmm}, methods={"baddbmm"}):
        # torch.baddbmm(input, batch1, batch2, *, beta, alpha) or input.baddbmm(...), any of them
        # by keyword (Bloom: ``alibi.baddbmm(batch1=q, batch2=kᵀ, beta=β, alpha=α)``)
        a = dict(zip(("input", "batch1", "batch2", "beta", "alpha"), inner.args))
        a.update(inner.kwargs)
        if not {"input", "batch1", "batch2"} <= a.keys():
            return None
        bias, q3, kt = a["input"], a["batch1"], a["batch2"]
        beta, alpha = a.get("beta", 1.0), a.get("alpha", 1.0)
        if not isinstance(beta, (int, float)) or not isinstance(alpha, (int, float)) or alpha <= 0:
            return None
        if beta == 0:
            bias = None
    elif is_call(inner, fns={torch.bmm}, methods={"bmm"}):
        a = dict(zip(("input", "mat2"), inner.args))
        a.update(inner.kwargs)
        if not {"input", "mat2"} <= a.keys():
            return None
        q3, kt = a["input"], a["mat2"]
    else:
        return None
    if not _is_transpose_last_two(kt, 3):
        return None
    k3 = kt.args[0]
    eq, ek = example(q3), example(k3)
    if eq is None or ek is None or eq.dim() != 3 or eq.shape[0] != B * H:
        return None
    form = ScoresForm(q3, k3, scale=float(alpha), bias=bias, bias_beta=float(beta))
    form.q_shape = (B, H, eq.shape[1], eq.shape[2])
    form.k_shape = (B, H, ek.shape[1], ek.shape[2])
    return form


def match_scores(logits) -> ScoresForm | None:
    """The product q kᵀ that ``logits`` [B, H, S, S] is (see the module docstring), or None."""
    if is_call(logits, fns=_MATMUL, methods={"matmul"}):
        q, kt = logits.args[:2]
        if _is_transpose_last_two(kt, 4):
            return ScoresForm(q, kt.args[0])
        return None
    return _einsum_scores(logits) or _bmm_scores(logits)


def _bmm_value_product(node) -> ValueForm | None:
    """``bmm(probs.view(B·H, S, S), v3).view(B, H, S, Dv)``: the [B, H, S, Dv] view is the node."""
    if not is_call(node, methods={"view", "reshape"}) or not is_call(node.args[0], fns={torch.bmm}, methods={"bmm"}):
        return None
    out, bmm = example(node), node.args[0]
    if out is None or out.dim() != 4 or len(bmm.args) != 2 or bmm.kwargs:
        return None
    probs3, v3 = bmm.args
    if not is_call(probs3, methods={"view", "reshape"}):
        return None
    probs, ep, ev = probs3.args[0], example(probs3.args[0]), example(v3)
    B, H, S, Dv = out.shape
    if ep is None or ev is None or ep.dim() != 4 or tuple(ep.shape[:3]) != (B, H, S) or \
            tuple(ev.shape) != (B * H, ep.shape[-1], Dv):
        return None
    return ValueForm(probs, v3, v_shape=(B, H, ep.shape[-1], Dv))


def match_value_product(node) -> ValueForm | None:
    """``probs @ v`` (matmul, einsum or a viewed bmm) with probs [B, H, S, S] over keys on the
    last dim."""
    if is_call(node, fns=_MATMUL, methods={"matmul"}):
        return ValueForm(*node.args[:2])
    bmm = _bmm_value_product(node)
    if bmm is not None:
        return bmm
    parts = _einsum_parts(node)
    if parts is None:
        return None
    (a, b), out, (p, v) = parts
    if len(a) != 4 or len(b) != 4 or len(out) != 4:
        return None
    bb, h, i, j = a
    e = set(b) - set(a)
    if len(e) != 1 or set(b) != {bb, h, j, *e} or set(out) != {bb, h, i, *e}:
        return None
    e = e.pop()
    canonical = bb + h + i + e
    return ValueForm(p, v, _perm(b, bb + h + j + e), _perm(canonical, out))


def unrepeat_kv(node):
    """The un-repeated K/V of GQA: ``x[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv*n, S, D)``
    or ``x.repeat_interleave(n, dim=1)`` → x (query head h reads kv head h // n in both); any
    other node is returned as it is."""
    if is_call(node, fns=_REPEAT_INTERLEAVE, methods={"repeat_interleave"}):
        repeats = node.kwargs.get("repeats", node.args[1] if len(node.args) > 1 else None)
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        base = example(node.args[0])
        if isinstance(repeats, int) and dim in (1, -3) and base is not None and base.dim() == 4:
            return node.args[0]
        return node
    if not is_call(node, methods={"reshape", "view"}):
        return node
    exp = node.args[0]
    if not is_call(exp, methods={"expand"}):
        return node
    idx = exp.args[0]
    full = slice(None, None, None)
    if not (is_call(idx, fns={operator.getitem}) and isinstance(idx.args[1], tuple) and 3 <= len(idx.args[1]) <= 5
            and idx.args[1][2] is None and all(i == full for j, i in enumerate(idx.args[1]) if j != 2)):
        return node                                   # x[:, :, None] or x[:, :, None, :, :]
    base = idx.args[0]
    b = example(base)
    if b is None or b.dim() != 4 or example(node).shape[1] % b.shape[1]:
        return node
    return base


def _constant(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def peel_softcap(node):
    """(inner, cap) for ``cap * tanh(inner / cap)`` (Gemma 2's attention-logit soft-capping, also
    written ``tanh(inner * (1/cap)) * cap``), else (node, None)."""
    if not is_call(node, fns={operator.mul, torch.mul}, methods={"mul"}):
        return node, None
    a, b = node.args[:2]
    cap, th = (_constant(b), a) if _constant(b) is not None else (_constant(a), b)
    if cap is None or cap <= 0 or not is_call(th, fns={torch.tanh}, methods={"tanh"}):
        return node, None
    inner = th.args[0]
    if is_call(inner, fns={operator.truediv, torch.div}, methods={"div"}) and _constant(inner.args[1]) == cap:
        return inner.args[0], cap
    if is_call(inner, fns={operator.mul, torch.mul}, methods={"mul"}) and _constant(inner.args[1]) is not None \
            and abs(_constant(inner.args[1]) * cap - 1.0) < 1e-12:
        return inner.args[0], cap
    return node, None


def _plain_leaves(vals):
    """Tensors of ``vals``, a tensor subclass (a fake ``SequenceShard`` of a frame whose input is a
    shard) by its inner tensors, which carry the fake mode."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    out = []
    for t in torch.utils._pytree.tree_leaves(vals):
        if is_traceable_wrapper_subclass(t):
            out.extend(_plain_leaves([getattr(t, name) for name in t.__tensor_flatten__()[0]]))
        else:
            out.append(t)
    return out


def emit(graph: fx.Graph, target, args, op: str = "call_function", kwargs=None) -> fx.Node:
    """A new node (at the graph's insertion point) with its ``example_value`` computed from its
    inputs' under their fake mode (so tensors the op makes itself, an ``arange``, are fake too)."""
    kwargs = kwargs or {}
    vals = fx.node.map_arg((args, kwargs), example)
    fakes = [t for t in _plain_leaves(vals) if isinstance(t, FakeTensor)]
    fake_mode = fakes[0].fake_mode if fakes else None      # the tensors' own mode (not the tracing context's)
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        if op == "call_method":
            value = getattr(vals[0][0], target)(*vals[0][1:], **vals[1])
        else:
            value = target(*vals[0], **vals[1])
    node = graph.create_node(op, target, args, kwargs)
    node.meta["example_value"] = value
    return node


def to_bhsd(graph: fx.Graph, node: fx.Node, perm: tuple | None, shape: tuple | None = None) -> fx.Node:
    """``node`` brought to [B, H, S, D]: viewed to ``shape`` and/or permuted by ``perm``."""
    if shape is not None:
        node = emit(graph, "reshape", (node, shape), op="call_method")
    if perm is not None:
        node = emit(graph, "permute", (node, perm), op="call_method")
    return node
