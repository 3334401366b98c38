"""The public runtime functions: ring attention on local shards, and moving tensors between
their full form and a rank's shard (docs/architecture.md). Options left as ``None`` take the registry's
value (``SEQPAR_*`` env or default).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar_compiler.kernels import AttentionSpec
from seqpar_compiler.runtime import gather_sequence_op, ring_attention_op, shard_sequence_op
from seqpar_compiler.runtime.grad_collectives import sum_grad_over_group
from seqpar_compiler.runtime.sharding.layout import Hybrid, layout_of

from .options import get_option
from .ulysses_api import hybrid_layout, ulysses_attention

__all__ = ["ring_attention", "ulysses_attention", "shard_sequence", "gather_sequence"]


def _names_hybrid(schedule) -> bool:
    """``hybrid:u``: a layout the options registry does not list (its choices name ``hybrid``)."""
    try:
        return isinstance(layout_of(schedule), Hybrid)
    except ValueError:
        return False


def _fixed_schedule(schedule: str | None, ulysses_degree: int | None = None,
                    group: dist.ProcessGroup | None = None) -> str:
    """The layout of tensors the caller already sharded: ``auto`` cannot name one (the compiler
    decides it per graph), so it is refused here. ``hybrid`` becomes ``hybrid:u``."""
    if not _names_hybrid(schedule):
        schedule = get_option("schedule", schedule)
    if schedule == "auto":
        raise ValueError("schedule 'auto' is chosen by the compiler per graph; the runtime functions work on "
                         "tensors in a known layout: pass one of ring, zigzag, striped, distflash, ulysses, hybrid")
    return hybrid_layout(schedule, ulysses_degree, group)


def attention_arguments(q, *, causal, scale, window, doc_ids, key_padding, alibi_slopes, softcap, rel_bias=None,
                        learned_table: bool = False):
    """The op's ``spec`` (an encoded ``AttentionSpec``) and trailing tensors (doc_ids,
    key_padding, alibi_slopes, rel_bias) from the public keyword arguments, with clear errors for
    values the attention ops cannot take. Shared by ring_attention and ulysses_attention, which
    compute a table's gradient (``learned_table``: the caller sums it over the group)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    fixed = (("alibi_slopes", alibi_slopes),) + ((("rel_bias", rel_bias),) if not learned_table else ())
    for name, t in fixed:
        if t is not None and t.requires_grad:
            raise ValueError(f"{name} must not require grad here (no gradient is computed for it); "
                             f"pass {name}.detach()")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))):
        raise ValueError(f"softcap must be a float > 0; got {softcap!r}")
    if key_padding is not None and key_padding.dtype != torch.bool:
        raise ValueError(f"key_padding must be a bool tensor [B, S_local] (True = the key may be seen); "
                         f"got {key_padding.dtype}")
    spec = AttentionSpec.of(causal=bool(causal), window=window, scale=float(scale), docs=doc_ids is not None,
                            key_padding=key_padding is not None, alibi=alibi_slopes is not None,
                            rel_bias=rel_bias is not None, softcap=None if softcap is None else float(softcap))
    tensors = (doc_ids, key_padding, alibi_slopes, rel_bias)
    while tensors and tensors[-1] is None:
        tensors = tensors[:-1]
    return spec.encode(), tensors


def _group_name(group: dist.ProcessGroup | None) -> str:
    """The name the ops take: '' for no group or a group of one."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return ""
        group = dist.group.WORLD
    if dist.get_world_size(group) == 1:
        return ""
    return group.group_name


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   scale: float | None = None, window: int | None = None, doc_ids: torch.Tensor | None = None,
                   schedule: str = "zigzag", group: dist.ProcessGroup | None = None, return_lse: bool = False,
                   overlap: bool | None = None, kernel: str | None = None,
                   alibi_slopes: torch.Tensor | None = None, softcap: float | None = None,
                   key_padding: torch.Tensor | None = None, rel_bias: torch.Tensor | None = None):
    """Exact softmax attention of this rank's queries over the whole group's keys, as a ring.

    Shape legend (this rank's shard; the sequence dim is split in ``schedule``'s layout, as
    ``shard_sequence`` makes it):
      q [B, Hq, S_local, D]; k [B, Hkv, S_local, D], v [B, Hkv, S_local, Dv] with Hq % Hkv == 0
      (GQA/MQA: K/V travel at Hkv heads; Dv may differ from D, as in MLA); doc_ids [B, S_local]
      integer; key_padding [B, S_local] bool; alibi_slopes [Hq] float; out [B, Hq, S_local, Dv];
      lse [B, Hq, S_local] fp32.

    Scores are ``s = scale · q kᵀ``; with ``softcap``, ``s ← softcap · tanh(s / softcap)``; with
    ``alibi_slopes``, ``s += slopes[h] · (k_pos − q_pos)`` over global positions; then the mask.

    Args:
        causal: key visible iff its global position <= the query's.
        scale: softmax scale; default ``D ** -0.5``.
        window: sliding window W >= 1: key visible iff q - W < k <= q (a window is causal).
        doc_ids: packed-document ids of the local tokens: keys visible only within the same
            document (combines with ``causal``/``window``).
        schedule: ``ring``, ``zigzag``, ``striped`` or ``distflash`` (docs/architecture.md).
        group: the sequence-parallel process group; default the whole default group.
        return_lse: also return the log-sum-exp (natural log).
        overlap: post the next KV block's transfer before computing (``SEQPAR_OVERLAP``).
        kernel: ``auto``, ``aten``, ``triton`` or ``math`` (``SEQPAR_KERNEL``).
        alibi_slopes: ALiBi's per-head slopes [Hq] (fixed: they get no gradient); the bias is
            evaluated per block from global positions, never materialised as S×S. MPT's key-only
            form ``slopes[h] · k_pos`` differs by a per-query constant, which softmax ignores.
        softcap: attention-logit soft-capping (Gemma 2), a float > 0.
        key_padding: which local tokens' keys may be seen (True) — a padding mask, sharded like
            the tokens; it travels with its K/V block (combines with every other mask).
        rel_bias: a per-head bias of the offset, [Hq, 2S - 1] over the global length S: scores
            get ``rel_bias[h, k_pos - q_pos + S - 1]`` (a symmetric ALiBi, T5's bucketed bias
            looked up per offset); replicated, evaluated per block by the math / ATen kernels. It
            may require grad (a learned bias): its gradient is summed over blocks and ranks.

    Returns:
        ``out``, or ``(out, lse)`` with ``return_lse``. Differentiable in q, k, v (and lse).
        A query that sees no key gets out = 0 and lse = -inf.
    """
    schedule = _fixed_schedule(schedule)
    overlap = get_option("overlap", overlap)
    kernel = get_option("kernel", kernel)
    spec, tensors = attention_arguments(q, causal=causal, scale=scale, window=window, doc_ids=doc_ids,
                                        key_padding=key_padding, alibi_slopes=alibi_slopes, softcap=softcap,
                                        rel_bias=rel_bias, learned_table=True)
    group_name = _group_name(group)
    if rel_bias is not None and rel_bias.requires_grad and group_name:
        # each rank's ring computes the table's gradient over its own queries: the sum is whole
        tensors = (*tensors[:3], sum_grad_over_group(rel_bias, group_name))
    out, lse = ring_attention_op(q, k, v, spec, schedule, group_name, overlap, kernel, *tensors)
    return (out, lse) if return_lse else out


def shard_sequence(x: torch.Tensor, dim: int, *, schedule: str = "zigzag",
                   group: dist.ProcessGroup | None = None, ulysses_degree: int | None = None) -> torch.Tensor:
    """This rank's part of the full tensor ``x`` along ``dim``, in ``schedule``'s layout
    (``hybrid`` takes ``ulysses_degree``, or ``SEQPAR_ULYSSES_DEGREE``).

    Differentiable: the gradient of ``x`` is gathered, so every rank holds the same full gradient.
    """
    return shard_sequence_op(x, dim, _fixed_schedule(schedule, ulysses_degree, group), _group_name(group))


def gather_sequence(x: torch.Tensor, dim: int, *, schedule: str = "zigzag",
                    group: dist.ProcessGroup | None = None, ulysses_degree: int | None = None) -> torch.Tensor:
    """The full tensor, in natural order on every rank, from each rank's shard ``x`` along ``dim``.

    Differentiable: the gradient is this rank's slice of the full gradient (no communication).
    """
    return gather_sequence_op(x, dim, _fixed_schedule(schedule, ulysses_degree, group), _group_name(group))
