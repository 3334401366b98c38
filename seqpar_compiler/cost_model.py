"""A roofline model of ring attention per schedule, and the ``auto`` schedule built on it (docs/architecture.md).

From the ring plan (``runtime/plan.py``: which block each rank computes at each step and what it
sends) and a machine profile (``profile.py``) it predicts, per rank and step:
  * FLOPs in the stats convention (4·B·Hq·D per visible (query, key) pair),
  * compute seconds: the kernel tiles each block becomes, at the profile's rate; on a CPU host
    whose ranks share cores, ranks computing at once share them (processor sharing),
  * bytes sent to ring neighbours (KV blocks, DistFlashAttn's queries and results, the
    backward's fp32 dK/dV accumulators) and their seconds at the slowest hop's bandwidth,
and a step lasts as long as its slowest rank: max(compute, transfer) with overlap (less the
profile's overlap efficiency), compute + transfer without. Forward + backward = the call's time.

``choose_schedule`` evaluates every schedule the sequence length allows and picks the fastest
(ties within 1% go to the first of zigzag, striped, ring, distflash, then the all-to-all
schedules ``ulysses`` and ``hybrid:u`` that the heads allow, ``cost_model_a2a.py``). The backend calls it on
group rank 0 only and broadcasts the choice, so ranks never disagree.

CLI: ``python -m seqpar_compiler.cost_model calibrate [--out FILE]`` and
``python -m seqpar_compiler.cost_model predict --profile h100-dgx --P 8 --S 131072``.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from functools import lru_cache

from seqpar_compiler.kernels import BlockKind, classify_block, plan_tiles, visible_key_range
from seqpar_compiler.runtime import SCHEDULES, build_plan, local_segments
from seqpar_compiler.runtime.layout import layout_of, required_multiple
from seqpar_compiler.kernels import AttentionSpec as _Visibility
from seqpar_compiler.runtime.plan import segment_mask

from .cost_model_a2a import a2a_candidates, predict_a2a
from .cost_model_mixing import layout_ok, mixing_seconds
from .profile import Profile, calibrate, load_profile

__all__ = ["AttentionSpec", "StepCost", "Prediction", "predict", "choose_schedule", "allowed_schedules",
           "PREFERENCE", "NON_CAUSAL_PREFERENCE"]

PREFERENCE = ("zigzag", "striped", "ring", "distflash")
# without causal work to balance, zigzag and striped gain nothing, and a contiguous layout keeps
# a view that splits the sequence into rows (a token grid, DiT's unpatchify) sharded
NON_CAUSAL_PREFERENCE = ("ring", "distflash", "zigzag", "striped")
_TILE_ROWS = 256          # kernels/aten_cpu.py TILE_ROWS: masked blocks run in tiles of this many rows


@dataclass(frozen=True)
class AttentionSpec:
    """One attention call, global sizes: q [B, Hq, S, D], k/v [B, Hkv, S, D]."""

    B: int
    Hq: int
    Hkv: int
    S: int
    D: int
    causal: bool = True
    window: int | None = None
    dtype_bytes: int = 4
    backward: bool = True


@dataclass(frozen=True)
class StepCost:
    """One step of one direction (forward or backward); tuples are indexed by rank."""

    flops: tuple[int, ...]
    compute_seconds: tuple[float, ...]      # each rank alone, before sharing cores
    bytes_sent: tuple[int, ...]
    messages: tuple[int, ...]
    seconds: float = 0.0                    # the step as the model runs it (slowest rank)


@dataclass(frozen=True)
class Prediction:
    """Predicted time of one attention call (forward + backward when ``spec.backward``)."""

    schedule: str
    overlap: bool
    P: int
    spec: AttentionSpec
    forward: tuple[StepCost, ...]
    backward: tuple[StepCost, ...]
    seconds: float
    imbalance: float                        # max/mean FLOPs over ranks (1 = balanced)
    notes: dict = field(default_factory=dict)

    @property
    def forward_seconds(self) -> float:
        return sum(s.seconds for s in self.forward)

    @property
    def backward_seconds(self) -> float:
        return sum(s.seconds for s in self.backward)

    def rank_flops(self) -> list[int]:
        return [sum(s.flops[r] for s in self.forward + self.backward) for r in range(self.P)]


def allowed_schedules(S: int, P: int) -> list[str]:
    """Schedules that can split a global length S over P ranks."""
    return [s for s in PREFERENCE if S % required_multiple(s, P) == 0]


@lru_cache(maxsize=4096)
def _block_cost(schedule: str, P: int, S_local: int, qi: int, kj: int, causal: bool, window: int | None,
                tiles: str, extra_rows: float) -> tuple[int, float, int]:
    """Block (queries of rank qi, keys of rank kj) → (visible pairs, computed pairs, kernel calls).

    ``aten`` tiles: a full tile computes its rectangle, a causal tile T·(T/2 + extra), a masked
    ("dense") tile its whole rectangle; ``visible`` (flash kernels that skip masked tiles):
    visible pairs, plus the diagonal's extra per partial row block."""
    visible, computed, calls, kinds = 0, 0.0, 0, []
    q_segs, k_segs = local_segments(schedule, qi, P, S_local), local_segments(schedule, kj, P, S_local)
    own_causal = qi == kj and causal and window is None and len(q_segs) > 1
    for qs in q_segs:
        for ks in k_segs:
            mask = segment_mask(qs, ks, _Visibility.of(causal=causal, window=window))
            kind = classify_block(mask, qs.count, ks.count)
            if kind is BlockKind.EMPTY:
                continue
            kinds.append(kind)
            if kind is BlockKind.FULL:
                n = qs.count * ks.count
                visible, computed, calls = visible + n, computed + n, calls + 1
                continue
            lo, hi = visible_key_range(mask, qs.count, ks.count)
            n = int((hi - lo).clamp(min=0).sum())
            visible += n
            if tiles == "visible":
                computed, calls = computed + n + extra_rows * qs.count, calls + 1
                continue
            for tile in plan_tiles(mask, qs.count, ks.count, _TILE_ROWS):
                T, K = tile.q1 - tile.q0, tile.k1 - tile.k0
                computed += T * (T / 2 + extra_rows) if tile.mode == "causal" else T * K
                calls += 1
    if own_causal:                 # the ring runs a rank's own causal block as one causal call
        causal_cost = visible + extra_rows * S_local if tiles == "visible" else S_local * (S_local / 2 + extra_rows)
        return visible, causal_cost, 1
    if kinds and all(k is BlockKind.FULL for k in kinds):
        calls = 1                  # full pairs forming one rectangle run as one call (ring._blocks)
    return visible, computed, calls


def _shared_finish(work: list[float], cores: int | None, threads: int, slowdown: float = 1.0) -> list[float]:
    """Finish times of ranks computing ``work`` seconds each (alone) from t=0 on ``cores`` shared
    cores. n busy ranks run at min(1, cores / (n · threads)) of a core each (processor sharing),
    and a core runs 1/slowdown as fast once every core is busy (shared caches and memory
    bandwidth; measured by ``calibrate``), interpolated linearly in between."""
    if cores is None:
        return list(work)
    order = sorted(range(len(work)), key=lambda r: work[r])
    finish, now, done = [0.0] * len(work), 0.0, 0.0
    busy = [r for r in order if work[r] > 0]
    for i, r in enumerate(busy):
        demand = (len(busy) - i) * threads
        contention = 1.0 + (slowdown - 1.0) * (min(demand, cores) - 1) / max(cores - 1, 1)
        speed = min(1.0, cores / demand) / contention
        now += (work[r] - done) / speed
        done = work[r]
        finish[r] = now
    return finish


def _direction(spec: AttentionSpec, schedule: str, P: int, profile: Profile, overlap: bool,
               backward: bool) -> tuple[StepCost, ...]:
    S_local = spec.S // P
    plan = build_plan(schedule, P, S_local, _Visibility.of(causal=spec.causal, window=spec.window))
    per_pair = 4 * spec.B * spec.Hq * spec.D
    rate = profile.flops_per_second / (profile.backward_ratio if backward else 1.0)
    kv = 2 * spec.B * spec.Hkv * S_local * spec.D
    q = spec.B * spec.Hq * S_local * spec.D
    lse = spec.B * spec.Hq * S_local
    bw = profile.ring_bandwidth(P)
    steps = []
    for t, row in enumerate(plan.steps):
        flops, work, sent, msgs = [], [], [], []
        for r, st in enumerate(row):
            blocks = ([(r, st.holds)] if st.compute_own else []) + ([(st.help_q, r)] if st.help_q is not None else [])
            vis = comp = calls = 0
            for qi, kj in blocks:
                v, c, n = _block_cost(schedule, P, S_local, qi, kj, spec.causal, spec.window, profile.tiles,
                                      profile.causal_extra_rows)
                vis, comp, calls = vis + v, comp + c, calls + n
            flops.append(vis * per_pair)
            # a forward block's (out, lse) is merged into the running result; a backward block's
            # dq/dk/dv are added (about a quarter of a merge's element-wise work)
            merge = len(blocks) * q * profile.merge_seconds_per_element * (0.25 if backward else 1.0)
            work.append(comp * per_pair / rate + calls * profile.call_overhead + merge)
            b = m = 0
            if st.forward_kv:
                b, m = b + kv * spec.dtype_bytes, m + 2
            if backward and st.holds is not None and (st.forward_kv or st.holds != r):
                b, m = b + kv * 4, m + 2                        # fp32 dK/dV accumulator, onward or home
            if st.q_to is not None:                              # DistFlashAttn: q (backward: q, dout, out, lse)
                b, m = (b + 3 * q * spec.dtype_bytes + lse * 4, m + 4) if backward else \
                    (b + q * spec.dtype_bytes, m + 1)
            if st.help_q is not None:                            # results back: (out, lse) or dQ, fp32
                b, m = (b + q * 4, m + 1) if backward else (b + q * 4 + lse * 4, m + 2)
            sent.append(b)
            msgs.append(m)
        finish = _shared_finish(work, profile.shared_cores, profile.threads_per_rank, profile.concurrency_slowdown)
        wire = [m * profile.latency + (b / bw if b else 0.0) for b, m in zip(sent, msgs)]
        if overlap:
            eff = profile.overlap_efficiency
            seconds = max(max(c, w) + (1 - eff) * min(c, w) for c, w in zip(finish, wire))
        else:
            seconds = max(c + w for c, w in zip(finish, wire))
        seconds += profile.step_overhead
        steps.append(StepCost(tuple(flops), tuple(work), tuple(sent), tuple(msgs), seconds))
    return tuple(steps)


def predict(spec: AttentionSpec, schedule: str, P: int, profile: Profile, *, overlap: bool = True) -> Prediction:
    """Predicted time of one attention call of ``spec`` under ``schedule`` on P ranks (an
    all-to-all schedule, ``ulysses`` or ``hybrid:u``, by ``cost_model_a2a``)."""
    if layout_of(schedule).all_to_all:
        return predict_a2a(spec, schedule, P, profile, overlap=overlap)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if spec.S % required_multiple(schedule, P):
        raise ValueError(f"S={spec.S} cannot be split by schedule {schedule!r} over {P} ranks; "
                         f"allowed here: {', '.join(allowed_schedules(spec.S, P)) or 'none'}")
    fwd = _direction(spec, schedule, P, profile, overlap, backward=False)
    bwd = _direction(spec, schedule, P, profile, overlap, backward=True) if spec.backward else ()
    flops = [sum(s.flops[r] for s in fwd) for r in range(P)]
    mean = sum(flops) / P
    imbalance = max(flops) / mean if mean else 1.0
    seconds = sum(s.seconds for s in fwd + bwd)
    return Prediction(schedule, overlap, P, spec, fwd, bwd, seconds, imbalance)


def choose_schedule(specs: list[AttentionSpec], P: int, profile: Profile,
                    overlaps: tuple[bool, ...] = (True, False), mixing: tuple = ()) -> tuple[str, bool, dict]:
    """The fastest (schedule, overlap) for the attention calls ``specs`` of one graph, and the
    predicted seconds of every candidate: {(schedule, overlap): seconds}. ``mixing``: the graph's
    sequence-mixing ops (``cost_model_mixing.MixingSpec``): a layout that cannot run one sharded
    is no candidate (unless none can), the others pay its halo and carry traffic."""
    if not specs:
        raise ValueError("choose_schedule needs at least one attention call")
    S = specs[0].S
    candidates = allowed_schedules(S, P)
    if not candidates:
        raise ValueError(f"sequence length {S} cannot be split over {P} ranks by any schedule: it must be a "
                         f"multiple of {P}; pad the sequence to a multiple of {2 * P}")
    # all-to-all schedules when every attention's heads split over their degree
    candidates = candidates + a2a_candidates(S, P, math.gcd(*(sp.Hq for sp in specs)))
    sharded = [s for s in candidates if all(layout_ok(m, s, P) for m in mixing)]
    candidates = sharded or candidates
    totals = {(s, o): sum(predict(sp, s, P, profile, overlap=o).seconds for sp in specs)
              + sum(mixing_seconds(m, s, P, profile) for m in mixing)
              for s in candidates for o in overlaps}
    best = min(totals.values())
    preference = PREFERENCE if any(sp.causal for sp in specs) else NON_CAUSAL_PREFERENCE
    for s in preference + tuple(c for c in candidates if c not in preference):
        for o in overlaps:
            if (s, o) in totals and totals[s, o] <= best * 1.01:
                return s, o, totals
    raise AssertionError("unreachable: the best candidate is in PREFERENCE")


def _main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m seqpar_compiler.cost_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="measure this machine and cache (or --out) its profile")
    cal.add_argument("--out", help="also write the profile to this .json file")
    pr = sub.add_parser("predict", help="print predictions of every schedule")
    pr.add_argument("--profile", default=None, help="profile name or .json (default: this machine's)")
    for name, default in (("P", 2), ("S", 8192), ("B", 1), ("H", 8), ("Hkv", None), ("D", 64), ("bytes", 4)):
        pr.add_argument(f"--{name}", type=int, default=default)
    pr.add_argument("--no-causal", action="store_true")
    args = ap.parse_args(argv)
    if args.command == "calibrate":
        import json
        profile = calibrate()
        print(json.dumps(profile.as_dict(), indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(profile.as_dict(), f, indent=2)
        return
    profile = load_profile(args.profile) or calibrate()
    spec = AttentionSpec(B=args.B, Hq=args.H, Hkv=args.Hkv or args.H, S=args.S, D=args.D,
                         causal=not args.no_causal, dtype_bytes=args.bytes)
    print(f"profile {profile.name}: P={args.P} S={args.S} B={args.B} H={args.H} D={args.D}")
    for s in allowed_schedules(args.S, args.P) + a2a_candidates(args.S, args.P, args.H):
        for o in (True, False):
            p = predict(spec, s, args.P, profile, overlap=o)
            print(f"  {s:10} overlap={'on ' if o else 'off'} {p.seconds * 1e3:10.2f} ms  "
                  f"(fwd {p.forward_seconds * 1e3:.2f}, bwd {p.backward_seconds * 1e3:.2f})  "
                  f"imbalance {p.imbalance:.3f}")


if __name__ == "__main__":
    _main()
