"""Why attention in a compiled frame runs replicated, in words a user can act on.

Attention that is not a ring runs on the whole sequence on every rank: correct, but it costs
P times the compute and the memory seqpar exists to save. A user must be told plainly, once per
frame and on rank 0 only, and told why. The causes, from the facts the passes leave behind:

  * no rule: an op upstream of the attention fell back (``rewrite`` writes
    ``node.meta["seqpar_fallback"]``); everything after it is replicated;
  * an unprovable mask: SDPA's rule refused an explicit mask, or hand-written attention
    (``softmax(q kᵀ) v``) stayed in the graph because ``attention_patterns`` could not prove its
    mask; a mask that is an input of the frame was built where seqpar cannot see it;
  * a region it cannot see: attention inside a higher-order op's body (``torch.utils.checkpoint``
    → ``tag_activation_checkpoint``), or in code Dynamo did not compile (a graph break,
    ``torch.compiler.disable``), found from Dynamo's graph-break counters.

Nothing here edits a graph; the backend prints (or raises, ``SEQPAR_FALLBACK=error``) and the
dump's summary lists the same lines.
"""
from __future__ import annotations

import operator
import re
from collections import Counter

import torch
import torch.fx as fx
import torch.nn.functional as F

from .dump import _source_line as source_line
from seqpar_compiler.passes.mask_proof import ancestors

__all__ = ["GraphBreakTracker", "hidden_attention_causes", "replicated_attention_causes", "replicated_message"]

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_MATMUL = {torch.matmul, operator.matmul, torch.bmm}
_SOFTMAX = {F.softmax, torch.softmax}
_CASTS = {"to", "type", "float", "type_as", "half", "bfloat16", "contiguous"}
_FRIENDLY_HOP = {"tag_activation_checkpoint": "torch.utils.checkpoint"}


def _softmax_matmul(node: fx.Node) -> bool:
    """``probs @ v`` with ``probs`` a softmax of 4-D scores (through casts and dropout): the shape
    of hand-written attention, whether or not its mask could be proved."""
    if not (node.op == "call_function" and node.target in _MATMUL
            or node.op == "call_method" and node.target == "matmul"):
        return False
    probs = node.args[0]
    while isinstance(probs, fx.Node) and (probs.op == "call_method" and probs.target in _CASTS
                                          or probs.op == "call_function" and probs.target is F.dropout):
        probs = probs.args[0]
    if not isinstance(probs, fx.Node):
        return False
    if not (probs.op == "call_function" and probs.target in _SOFTMAX
            or probs.op == "call_method" and probs.target == "softmax"):
        return False
    ex = probs.meta.get("example_value")
    return isinstance(ex, torch.Tensor) and ex.dim() == 4


def _has_attention(gm: fx.GraphModule) -> bool:
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _SDPA or _softmax_matmul(n):
            return True
        if n.op == "get_attr" and isinstance(getattr(gm, str(n.target), None), fx.GraphModule):
            if _has_attention(getattr(gm, str(n.target))):
                return True
    return False


def hidden_attention_causes(gm: fx.GraphModule) -> list[str]:
    """Attention the canonicalize pass left unrecognised (after it ran): inside a higher-order
    op's body, or hand-written with a mask it could not prove."""
    causes = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator):
            bodies = [getattr(gm, str(a.target)) for a in n.args
                      if isinstance(a, fx.Node) and a.op == "get_attr"
                      and isinstance(getattr(gm, str(a.target), None), fx.GraphModule)]
            if any(_has_attention(b) for b in bodies):
                name = n.target.name()
                what = _FRIENDLY_HOP.get(name, f"a {name} region")
                causes.append(f"attention inside {what} ({name} at {source_line(n)}), a region seqpar cannot see "
                              f"into: remove that wrapper around attention (SEQPAR_CHECKPOINT=remat-aware already "
                              f"chooses what the backward recomputes)")
        elif _softmax_matmul(n) and n.meta.get("seqpar_unproved"):     # attention_patterns.UNPROVED
            causes.append(f"hand-written attention at {source_line(n)} with {n.meta['seqpar_unproved']}")
        elif _softmax_matmul(n):
            causes.append(f"hand-written attention at {source_line(n)} whose mask seqpar cannot prove causal, a "
                          f"sliding window or packed documents (built from positions inside the compiled code): "
                          f"build the mask from arange/position ids inside the model, or call "
                          f"F.scaled_dot_product_attention(is_causal=True)")
    return causes


def _is_frame_input(node: fx.Node) -> bool:
    return isinstance(node, fx.Node) and node.op == "placeholder"


def _mask_of(node: fx.Node):
    if node.target in _SDPA:
        return node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    return None


def replicated_attention_causes(attention: list[fx.Node], placements: dict, S: int | None = None) -> list[str]:
    """For each attention node the rewrite left replicated, why (one line each, duplicates merged).

    ``placements`` is the rewrite's old node → placement map; ``Shard`` placements have a ``dim``;
    ``S`` the length the frame splits (an attention over another length is said as such).
    """
    from seqpar_compiler.passes.placement import Shard
    causes: list[str] = []
    for att in attention:
        if isinstance(placements.get(att), Shard):
            continue
        own = att.meta.get("seqpar_fallback")
        if own and "mask" in own:
            mask = _mask_of(att)
            where = (" and it is an input of this frame (built in another frame or eagerly, where seqpar cannot "
                     "prove it)" if _is_frame_input(mask) else "")
            cause = (f"attention at {source_line(att)}: {own}{where}: build the mask inside the compiled model "
                     f"from positions (arange / position ids), or pass is_causal=True")
        elif own:
            cause = f"attention at {source_line(att)}: {own}"
        elif S is not None and _query_length(att) not in (None, S):
            cause = (f"attention at {source_line(att)} is over a sequence of another length "
                     f"({_query_length(att)} queries; this frame splits the length-{S} one, e.g. an encoder's): "
                     f"it runs whole on every rank")
        else:
            upstream = [a for a in _ancestors(att) if a.meta.get("seqpar_fallback")]
            if upstream:
                first = min(upstream, key=_order(att.graph))
                cause = (f"attention at {source_line(att)}: no sharding rule for {_op(first)} at "
                         f"{source_line(first)} upstream of it ({first.meta['seqpar_fallback']}), so everything "
                         f"after it runs replicated: add a rule (docs/adding_a_sharding_rule.md) or move that op "
                         f"out of the compiled code")
            else:
                cause = (f"attention at {source_line(att)}: its q/k/v never meet a sharded op (no embedding, "
                         f"linear or norm on a sequence input before it)")
        if cause not in causes:
            causes.append(cause)
    return causes


def _query_length(att: fx.Node) -> int | None:
    q = att.args[0].meta.get("example_value") if att.args and isinstance(att.args[0], fx.Node) else None
    return int(q.shape[-2]) if isinstance(q, torch.Tensor) and q.dim() >= 2 else None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node ``node`` is computed from (not ``node`` itself)."""
    return set(ancestors(node)) - {node}


def _order(graph: fx.Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index.get(n, 0)


def _op(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return f"Tensor.{t}"
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


class GraphBreakTracker:
    """Graph breaks Dynamo recorded since the last call (its ``counters["graph_break"]``): code
    around them ran eagerly, on the whole sequence on every rank."""

    def __init__(self):
        self._seen: Counter = Counter()

    def new_breaks(self) -> list[str]:
        from torch._dynamo.utils import counters
        now = Counter(counters["graph_break"])
        if sum(now.values()) < sum(self._seen.values()):
            self._seen = Counter()          # torch._dynamo.reset() cleared the counters
        new = [reason for reason, count in now.items() if count > self._seen.get(reason, 0)]
        self._seen = now
        return [_break_cause(r) for r in new]


def _break_cause(reason: str) -> str:
    first = reason.strip().splitlines()[0] if reason.strip() else "a graph break"
    fn = re.search(r"Skip calling function `<function (\S+)", reason)
    if "torch.compiler.disable" in reason and fn:
        return (f"Dynamo did not compile `{fn.group(1)}` (torch.compiler.disable): if the model's attention runs "
                f"there, it runs eagerly on the whole sequence on every rank: remove torch.compiler.disable "
                f"around attention")
    return (f"Dynamo broke the graph ({first}): code at the break runs eagerly on the whole sequence on every "
            f"rank; if the model's attention is there, remove the graph break (TORCH_LOGS=graph_breaks shows where)")


def replicated_message(frame: str, causes: list[str], P: int) -> str:
    """The one line the backend prints for a frame whose attention runs replicated."""
    counts = Counter(causes)             # layers of one model share a source line: say it once
    said = [c if counts[c] == 1 else f"{c} ({counts[c]} times)" for c in counts]
    return (f"seqpar: attention in frame {frame} runs replicated (the whole sequence on each of the {P} ranks, "
            f"no memory saved): " + "; ".join(said) + ". SEQPAR_DUMP=DIR shows the graphs; "
            f"SEQPAR_FALLBACK=error makes this an error")
