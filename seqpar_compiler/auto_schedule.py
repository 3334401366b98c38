"""``SEQPAR_SCHEDULE=auto``: the cost model picks a graph's schedule on group rank 0, which
broadcasts it, so every rank shards the same way (docs/architecture.md).

The attention calls of the graph become ``AttentionSpec``s (global shapes from Dynamo's
``example_value``); rank 0 loads the profile (``SEQPAR_PROFILE``; with none cached, the whole
group calibrates once, collectively), predicts every schedule the sequence length allows and
broadcasts the fastest. Only rank 0's profile and cache matter, so ranks on hosts with different
caches still agree.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.fx as fx

from .runtime.control import control_broadcast_object, control_device
from .cost_model import AttentionSpec, allowed_schedules, choose_schedule
from .profile import Profile, calibrate, load_profile

__all__ = ["AutoDecision", "attention_specs", "decide_schedule"]

log = logging.getLogger("seqpar")


class AutoDecision(dict):
    """What ``auto`` chose and why: schedule, overlap, profile name, predicted seconds per candidate
    (``candidates``: {"zigzag/overlap": s, ...}; rank 0 only), and ``why``: one line naming the
    choice, its all-to-all / attention split and the runner-up."""


def _spec(q, k, causal: bool, window) -> AttentionSpec | None:
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)) or q.dim() != 4 or k.dim() != 4:
        return None
    B, Hq, S, D = (int(x) for x in q.shape)
    return AttentionSpec(B=B, Hq=Hq, Hkv=int(k.shape[1]), S=S, D=D, causal=bool(causal or window is not None),
                         window=window, dtype_bytes=q.element_size(), backward=bool(q.requires_grad))


def attention_specs(attention: list[fx.Node]) -> list[AttentionSpec]:
    """The ring attention calls of the graph, from ``find_attention``'s nodes (SDPA calls with a
    mask are left out: they fall back, the ring never sees them)."""
    from seqpar_compiler.passes.attention_patterns import canonical_attention, canonical_spec
    specs = []
    for node in attention:
        ex = [a.meta.get("example_value") if isinstance(a, fx.Node) else None for a in node.args[:2]]
        if node.target is canonical_attention:
            form = canonical_spec(node)             # the cost model counts causal and window work only
            spec = _spec(ex[0], ex[1], form.causal, form.window)
        else:
            names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
            args = dict(zip(names, node.args), **node.kwargs)
            if args.get("attn_mask") is not None:
                continue
            spec = _spec(ex[0], ex[1], args.get("is_causal", False), None)
        if spec is not None:
            specs.append(spec)
    return specs


def _profile(name: str | None, pg) -> Profile:
    """Every rank validates a named profile (a bad name fails everywhere, not only on rank 0);
    without a name, rank 0's cache decides whether the group calibrates now."""
    profile = load_profile(name) if name else None
    if name:
        return profile
    device = control_device(pg)
    if device.type != "cpu":
        # calibrate() times the CPU kernels; a GPU group gets a GPU profile
        if dist.get_rank(pg) == 0:
            log.warning("seqpar: SCHEDULE=auto on a %s group without SEQPAR_PROFILE: using the shipped h100-dgx "
                        "profile (SEQPAR_PROFILE=a100-dgx or a .json file names another)", device.type)
        return load_profile("h100-dgx")
    cached = control_broadcast_object(load_profile(None) is not None if dist.get_rank(pg) == 0 else None, pg)
    if not cached:
        if dist.get_rank(pg) == 0:       # one line per group, not one per rank
            log.warning("seqpar: SCHEDULE=auto with no cost-model profile of this machine yet: calibrating "
                        "(once; cached at the user's cache folder; SEQPAR_PROFILE names another)")
        return calibrate(pg)
    return load_profile(None) if dist.get_rank(pg) == 0 else None


def _why(schedule: str, overlap: bool, totals: dict, specs, P: int, profile: Profile) -> str:
    """One line for the dump's summary: the choice, its predicted time and split, the runner-up."""
    from .cost_model import predict
    if not totals:
        return "no ring call to weigh: the first schedule the length allows"
    best = totals[schedule, overlap]
    others = sorted((t, s) for (s, o), t in totals.items() if s != schedule)
    pred = predict(specs[0], schedule, P, profile, overlap=overlap)
    split = ""
    if "a2a_seconds" in pred.notes:
        split = (f" (all-to-all {pred.notes['a2a_seconds'] * 1e3:.3g} ms + attention "
                 f"{pred.notes['attention_seconds'] * 1e3:.3g} ms for the first call)")
    heads = math.gcd(*(sp.Hq for sp in specs))
    a2a = "" if heads % P == 0 else f"; ulysses needs heads divisible by {P}, the graph's have {heads}"
    runner = f", next best {others[0][1]} at {others[0][0] * 1e3:.4g} ms" if others else ""
    return (f"{schedule} predicted fastest at {best * 1e3:.4g} ms per step{split}{runner} "
            f"(imbalance {pred.imbalance:.3f}){a2a}")


def decide_schedule(attention: list[fx.Node], S: int, pg, profile_name: str | None,
                    overlaps: tuple[bool, ...], mixing: tuple = ()) -> AutoDecision:
    """Collective over ``pg``: the schedule (and overlap, among ``overlaps``) for this graph;
    ``mixing``: its sequence-mixing ops (``cost_model_mixing.mixing_specs``), which rule out the
    layouts they cannot run sharded on."""
    P, rank = dist.get_world_size(pg), dist.get_rank(pg)
    if not allowed_schedules(S, P):        # the same on every rank: fail everywhere, clearly
        raise ValueError(f"the model's sequence length {S} cannot be split over {P} ranks by any schedule: it must "
                         f"be a multiple of {P} ({2 * P} for zigzag); pad the sequence")
    specs = attention_specs(attention)
    profile = _profile(profile_name, pg)
    box = [None]
    if rank == 0:
        try:
            if specs:
                schedule, overlap, totals = choose_schedule(specs, P, profile, overlaps, tuple(mixing))
            else:                          # no ring call (all attention falls back): nothing to weigh
                schedule, overlap, totals = allowed_schedules(S, P)[0], overlaps[0], {}
            box = [AutoDecision(schedule=schedule, overlap=overlap, profile=profile.name,
                                candidates={f"{s}/{'overlap' if o else 'no-overlap'}": t
                                            for (s, o), t in totals.items()},
                                why=_why(schedule, overlap, totals, specs, P, profile))]
        except Exception as err:  # noqa: BLE001 - tell the other ranks before raising
            control_broadcast_object(f"{type(err).__name__}: {err}", pg)
            raise
    decision = control_broadcast_object(box[0], pg)
    if isinstance(decision, str):
        raise RuntimeError(f"seqpar: group rank 0 could not choose a schedule ({decision})")
    if rank == 0:
        log.info("seqpar: SCHEDULE=auto chose %s (overlap %s) with profile %s", decision["schedule"],
                 "on" if decision["overlap"] else "off", decision["profile"])
    return decision
