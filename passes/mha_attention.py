"""``nn.MultiheadAttention`` → in-projections, one canonical attention node, out-projection.

Reads Dynamo's ``node.meta["example_value"]``; rewrites the graph in place. Dynamo keeps
``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer`` call) as one opaque call on [S, B, E] tensors (``batch_first``
models transpose around it), so no op rule could shard it. Self-attention with the plain
options is rewritten to what it computes:

    q, k, v = linear(x, W_q, b_q), linear(x, W_k, b_k), linear(x, W_v, b_v)   # [S, B, E]
    q, k, v → view(S, B, H, E/H).permute(1, 2, 0, 3)                            # [B, H, S, E/H]
    o = canonical_attention(q, k, v, spec, None, key_padding)                   # [B, H, S, E/H]
    out = linear(o.permute(2, 0, 1, 3).reshape(S, B, E), W_o, b_o)              # [S, B, E]

The mask follows torch's own rules: ``is_causal=True`` without ``need_weights`` or a key padding
mask *is* causal attention (torch passes it to SDPA as ``is_causal`` and ignores
``attn_mask``); otherwise ``attn_mask`` (bool: True = hidden; float: additive) must be proved
a band by evaluation. A boolean ``key_padding_mask`` [B, S] (True = ignore the key; the module
hands it on as ``zeros_like(m).masked_fill_(m, -inf)``) becomes the node's key validity; torch
turns it into an additive -inf mask for SDPA, which gives a query with no visible key 0, as the
spec says. Anything else — cross-attention,
``bias_k``/``add_zero_attn``, a float key padding mask, attention weights that are read,
unbatched input — is left as it is (and falls back). Attention dropout in training is refused as everywhere else (no per-block RNG).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .attention_forms import emit
from seqpar_compiler.kernels import AttentionSpec

from .mask_proof import example, is_call, static_mask_kind

__all__ = ["decompose_multi_head_attention"]

_NAMES = ["query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
          "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask",
          "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
          "static_k", "static_v", "average_attn_weights", "is_causal"]
_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
             "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
             "v_proj_weight": None, "static_k": None, "static_v": None, "average_attn_weights": True,
             "is_causal": False}


def _arguments(node) -> dict:
    a = dict(_DEFAULTS)
    a.update(zip(_NAMES, node.args))
    a.update(node.kwargs)
    return a


def _weights_unused(node) -> bool:
    """Only output 0 (the attention result) is read."""
    return all(is_call(u, fns={operator.getitem}) and (u.args[1] == 0 or not u.users) for u in node.users)


def _hidden_keys(kpm):
    """The bool [B, S] mask of ignored keys behind a ``key_padding_mask``: itself when bool, or
    the bool mask that ``nn.MultiheadAttention`` turned into ``zeros_like(m, float).masked_fill_(m,
    -inf)`` (``F._canonical_mask``); None for anything else (a float mask of the user's)."""
    if kpm is None:
        return None
    ex = example(kpm)
    if ex is not None and ex.dtype == torch.bool:
        return kpm
    if not (is_call(kpm, fns={torch.masked_fill}, methods={"masked_fill", "masked_fill_"}) and len(kpm.args) == 3):
        return None
    base, m, fill = kpm.args
    if not (is_call(base, fns={torch.zeros_like}) and base.args[0] is m and fill == float("-inf")):
        return None
    return m if example(m) is not None and example(m).dtype == torch.bool else None


def _mask(node, a, gm, values, static_inputs, shape, S):
    """The band ``AttentionSpec`` of the call's mask, or None when it cannot be proved."""
    if a["is_causal"] and not a["need_weights"] and a["key_padding_mask"] is None:
        return AttentionSpec.of(causal=True)
    mask = a["attn_mask"]
    if mask is None:
        return AttentionSpec()
    ex = example(mask)
    if ex is None or ex.dim() != 2:
        return None                      # a [B·H, S, S] mask: per-head masks are no kind we carry
    kind = static_mask_kind(mask, gm, values, static_inputs, shape, S, negated=ex.dtype == torch.bool, at=node)
    return None if kind is None or kind[1] is not None else kind[0]


def _projections(g, a, x, E):
    """(q, k, v) = the in-projections of ``x`` [S, B, E], each [S, B, E]."""
    if a["use_separate_proj_weight"]:
        weights = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]]
    else:
        weights = [emit(g, operator.getitem, (a["in_proj_weight"], slice(i * E, (i + 1) * E))) for i in range(3)]
    bias = a["in_proj_bias"]
    biases = [None] * 3 if bias is None else [emit(g, operator.getitem, (bias, slice(i * E, (i + 1) * E)))
                                              for i in range(3)]
    return [emit(g, F.linear, (x, w, b)) for w, b in zip(weights, biases)]


def _rewrite(gm, node, values, static_inputs) -> bool:
    from .attention_patterns import canonical_attention
    a = _arguments(node)
    x = a["query"]
    ex = example(x)
    if not (a["key"] is x and a["value"] is x and ex is not None and ex.dim() == 3 and _weights_unused(node)):
        return False
    if any(a[n] is not None for n in ("bias_k", "bias_v", "static_k", "static_v")) or a["add_zero_attn"]:
        return False
    kpm = _hidden_keys(a["key_padding_mask"])
    if a["key_padding_mask"] is not None and kpm is None:
        return False
    if a["dropout_p"] and a["training"]:
        raise ValueError(f"seqpar: attention dropout p={a['dropout_p']} is not supported yet (no per-block RNG); "
                         f"use dropout=0 in nn.MultiheadAttention / nn.TransformerEncoderLayer")
    S, B, E = ex.shape
    H = a["num_heads"]
    if not isinstance(H, int) or E % H:
        return False
    band = _mask(node, a, gm, values, static_inputs, (B, H, S, S), S)
    if band is None or (kpm is not None and tuple(example(kpm).shape) != (B, S)):
        return False
    spec = band.with_(scale=float((E // H) ** -0.5), key_padding=kpm is not None)
    g = gm.graph
    with g.inserting_before(node):
        heads = [emit(g, "permute", (emit(g, "view", (t, (S, B, H, E // H)), op="call_method"), (1, 2, 0, 3)),
                      op="call_method") for t in _projections(g, a, x, E)]
        valid = None if kpm is None else emit(g, operator.invert, (kpm,))
        o = emit(g, canonical_attention, (*heads, spec.encode(), None, valid))
        o = emit(g, "reshape", (emit(g, "permute", (o, (2, 0, 1, 3)), op="call_method"), (S, B, E)),
                 op="call_method")
        out = emit(g, F.linear, (o, a["out_proj_weight"], a["out_proj_bias"]))
    o.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        g.erase_node(user)
    g.erase_node(node)
    return True


def decompose_multi_head_attention(gm: fx.GraphModule, values: dict, static_inputs: set) -> int:
    """Rewrite every self-attention ``F.multi_head_attention_forward`` call; return how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, fns={F.multi_head_attention_forward}):
            continue
        before = set(gm.graph.nodes)
        try:
            count += _rewrite(gm, node, values, static_inputs)
        except ValueError:
            raise
        except Exception:  # noqa: BLE001 - an unprovable call stays as it is (and falls back)
            for new in reversed([n for n in gm.graph.nodes if n not in before]):
                if not new.users:
                    gm.graph.erase_node(new)
    return count
