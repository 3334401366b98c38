"""The public all-to-all attention: ``ulysses_attention`` on local shards, and the
naming of the hybrid's layout (``hybrid`` + a Ulysses degree u → the layout ``hybrid:u``).

Choosing between the ring and Ulysses (docs/runtime_api.md, "All-to-all attention"): Ulysses gives every rank
the whole sequence for H/P heads, so its balance does not depend on the mask (packed documents,
windows) and its traffic per rank falls as P grows; it needs the query head count divisible by
its degree. The hybrid runs Ulysses inside groups of u consecutive ranks (a node) and a zigzag
ring across groups, for P beyond the head count or slow links between nodes.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from seqpar_compiler.runtime.sharding.layout import Hybrid, layout_of
from seqpar_compiler.runtime.ulysses import working_degrees
from seqpar_compiler.runtime.ulysses_op import ulysses_attention_op

from .options import get_option

__all__ = ["ulysses_attention", "hybrid_layout", "default_ulysses_degree", "describe_all_to_all"]


def default_ulysses_degree(P: int, Hq: int | None = None, node_size: int | None = None) -> int:
    """The hybrid's default degree: the largest divisor of P below P that divides the query head
    count (when known) and fits in a node (``node_size``, else torchrun's ``LOCAL_WORLD_SIZE``,
    else P). 1 (a plain zigzag ring) when none does."""
    if node_size is None:
        env = os.environ.get("LOCAL_WORLD_SIZE", "")
        node_size = int(env) if env.isdigit() and int(env) > 0 else P
    ok = [d for d in (working_degrees(P, Hq) if Hq else range(1, P + 1)) if P % d == 0 and d < P and d <= node_size]
    return max(ok, default=1)


def _group_size(group: dist.ProcessGroup | None) -> int:
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        group = dist.group.WORLD
    return dist.get_world_size(group)


def hybrid_layout(schedule: str, ulysses_degree: int | None, group: dist.ProcessGroup | None, *,
                  strict: bool = True) -> str:
    """``schedule`` as a layout name: ``hybrid`` with degree u → ``hybrid:u`` (u from the argument,
    ``SEQPAR_ULYSSES_DEGREE``, or ``default_ulysses_degree`` of the group size alone, so
    ``shard_sequence`` and ``ulysses_attention`` agree without seeing the heads); any other name
    unchanged. ``strict``: a degree given with another schedule is an error (the backend passes
    ``SEQPAR_ULYSSES_DEGREE`` whatever the schedule, so it is not strict)."""
    if schedule != "hybrid":
        if strict and ulysses_degree is not None and not isinstance(layout_of(schedule), Hybrid):
            raise ValueError(f"ulysses_degree applies to schedule 'hybrid' only; got schedule {schedule!r}")
        return schedule
    u = get_option("ulysses_degree", ulysses_degree)
    P = _group_size(group)
    if u is None:
        u = default_ulysses_degree(P)
    if u > P:
        raise ValueError(f"ulysses_degree {u} is larger than the sequence group ({P} ranks); it must divide {P}")
    if P % u:
        ok = [d for d in range(1, P + 1) if P % d == 0]
        raise ValueError(f"ulysses_degree {u} must divide the sequence group's size {P}; allowed: "
                         f"{', '.join(map(str, ok))}")
    return f"hybrid:{u}"


def _all_to_all(schedule) -> bool:
    """Does ``schedule`` name an all-to-all layout (``ulysses``, ``hybrid:u``)?"""
    try:
        return layout_of(schedule).all_to_all
    except ValueError:
        return False


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                      scale: float | None = None, window: int | None = None, doc_ids: torch.Tensor | None = None,
                      schedule: str = "ulysses", ulysses_degree: int | None = None,
                      group: dist.ProcessGroup | None = None, return_lse: bool = False,
                      overlap: bool | None = None, kernel: str | None = None,
                      alibi_slopes: torch.Tensor | None = None, softcap: float | None = None,
                      key_padding: torch.Tensor | None = None, rel_bias: torch.Tensor | None = None):
    """Exact softmax attention of this rank's queries over the whole group's keys, by all-to-all.

    Shape legend (this rank's shard; the sequence dim is split in ``schedule``'s layout, as
    ``shard_sequence(..., schedule=schedule, ulysses_degree=...)`` makes it):
      q [B, Hq, S_local, D]; k [B, Hkv, S_local, D], v [B, Hkv, S_local, Dv]; doc_ids [B, S_local];
      key_padding [B, S_local] bool; alibi_slopes [Hq]; out [B, Hq, S_local, Dv];
      lse [B, Hq, S_local] fp32.
    Hq must be divisible by the degree (P for ``ulysses``); Hkv need not be (KV heads are
    replicated to lcm(Hkv, u) before the all-to-all).

    Args:
        causal, scale, window, doc_ids, overlap, kernel, alibi_slopes, softcap, key_padding, rel_bias:
            as ``ring_attention``.
        schedule: ``ulysses`` (all-to-all over the whole group, contiguous layout) or ``hybrid``
            (all-to-all inside groups of ``ulysses_degree`` consecutive ranks, zigzag ring across).
        ulysses_degree: the hybrid's group size u (divides P); default ``SEQPAR_ULYSSES_DEGREE``
            or the largest divisor of P below P within a node (``default_ulysses_degree``).
        group: the sequence-parallel process group; default the whole default group.
        return_lse: also return the log-sum-exp (natural log).

    Returns:
        ``out``, or ``(out, lse)`` with ``return_lse``. Differentiable in q, k, v.
    """
    if schedule != "hybrid" and not _all_to_all(schedule):
        raise ValueError(f"ulysses_attention takes schedule 'ulysses' or 'hybrid'; got {schedule!r} (the ring "
                         f"schedules run through ring_attention)")
    from .api import _group_name, attention_arguments
    layout = hybrid_layout(schedule, ulysses_degree, group)
    overlap = get_option("overlap", overlap)
    kernel = get_option("kernel", kernel)
    spec, tensors = attention_arguments(q, causal=causal, scale=scale, window=window, doc_ids=doc_ids,
                                        key_padding=key_padding, alibi_slopes=alibi_slopes, softcap=softcap,
                                        rel_bias=rel_bias, learned_table=True)
    group_name = _group_name(group)
    if rel_bias is not None and rel_bias.requires_grad and group_name:
        # each rank computes its heads' rows from the pairs its inner ring attends: the sum is whole
        from seqpar_compiler.runtime.grad_collectives import sum_grad_over_group
        tensors = (*tensors[:3], sum_grad_over_group(rel_bias, group_name))
    out, lse, *_saved = ulysses_attention_op(q, k, v, spec, layout, group_name, overlap, kernel, *tensors)
    return (out, lse) if return_lse else out


def describe_all_to_all(schedule: str, P: int, ulysses_degree: int | None, chosen_by_auto: bool) -> str | None:
    """One line for the dump's summary: how an all-to-all layout splits the group and where its
    degree came from (None for the ring schedules)."""
    layout = layout_of(schedule)
    if layout.all_to_all and not isinstance(layout, Hybrid):
        return (f"all-to-all over all {P} ranks (heads split {P} ways, each rank attends over the whole "
                f"sequence), no ring")
    if not isinstance(layout, Hybrid):
        return None
    u = layout.u
    if chosen_by_auto:
        source = "chosen by auto with the schedule"
    elif ulysses_degree is not None:
        source = "from SEQPAR_ULYSSES_DEGREE / backend(ulysses_degree=)"
    else:
        source = "the default: the largest divisor of P below P within a node (SEQPAR_ULYSSES_DEGREE unset)"
    return (f"all-to-all inside {P // u} group(s) of {u} consecutive ranks, zigzag ring across the groups; "
            f"degree {u} {source}")
