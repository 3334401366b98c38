"""The cost model's all-to-all terms: Ulysses and the Ulysses × ring hybrid.

An all-to-all schedule of degree u on P ranks (G = P/u groups) costs
  * the all-to-all: each rank sends (u−1)/u of what it exchanges (forward: q, k, v at the KV
    heads on the wire, out and lse back; backward: dout in and dq, dk, dv back — the forward's
    head-sharded q, k, v, out, lse are saved, ``runtime/ulysses.py``), blocking (nothing to overlap it with). The part that stays
    inside a node moves at the profile's ``bandwidth``, the part that leaves it at
    ``inter_node_bandwidth``, concurrently: the slower decides;
  * the attention on H/u heads of the group's sequence: the cost model's zigzag ring over the G
    groups (one local block when G = 1), with the ring's hop at the inter-node bandwidth once the
    group spans nodes. Ranks that share CPU cores: the G ring ranks each stand for u ranks
    computing at once, so each sees 1/u of the shared cores.
Documents are data the compiler does not see; like the ring's, these predictions assume the
masks of the spec (causal / window).
"""
from __future__ import annotations

import math
from dataclasses import replace

from seqpar_compiler.runtime.layout import layout_of, required_multiple

from .profile import Profile

__all__ = ["a2a_candidates", "a2a_bytes_per_rank", "predict_a2a"]


def a2a_candidates(S: int, P: int, Hq: int) -> list[str]:
    """All-to-all layouts that can split this attention: ``ulysses`` when P divides Hq, and
    ``hybrid:u`` for every proper divisor 1 < u < P of P that divides Hq."""
    out = []
    if P > 1 and Hq % P == 0 and S % required_multiple("ulysses", P) == 0:
        out.append("ulysses")
    for u in range(2, P):
        if P % u == 0 and Hq % u == 0 and S % required_multiple(f"hybrid:{u}", P) == 0:
            out.append(f"hybrid:{u}")
    return out


def degree(schedule: str, P: int) -> int:
    layout = layout_of(schedule)
    if not layout.all_to_all:
        raise ValueError(f"not an all-to-all schedule: {schedule!r}")
    return layout.ulysses_degree(P)


def a2a_bytes_per_rank(spec, schedule: str, P: int) -> tuple[int, int]:
    """Bytes one rank sends by all-to-all in the forward and in the backward."""
    u = degree(schedule, P)
    if u == 1:
        return 0, 0
    S_l = spec.S // P
    R = spec.Hkv if spec.Hkv % u == 0 else math.lcm(spec.Hkv, u)
    q = spec.B * spec.Hq * S_l * spec.D * spec.dtype_bytes
    kv = 2 * spec.B * R * S_l * spec.D * spec.dtype_bytes
    lse = spec.B * spec.Hq * S_l * 4
    fwd = (q + kv + q + lse) * (u - 1) // u                          # q, k, v out; out, lse back
    bwd = (q + q + kv) * (u - 1) // u if spec.backward else 0    # dout in; dq, dk, dv back
    return fwd, bwd


def _a2a_seconds(nbytes: int, u: int, P: int, profile: Profile, calls: int) -> float:
    """An all-to-all of ``nbytes`` per rank over u consecutive ranks, in ``calls`` collectives."""
    if u == 1 or nbytes == 0:
        return 0.0
    n = profile.gpus_per_node or u
    if profile.inter_node_bandwidth is not None and u > n:
        off = nbytes * (u - n) / (u - 1)              # peers outside this rank's node
        wire = max(off / profile.inter_node_bandwidth, (nbytes - off) / profile.bandwidth)
    else:
        wire = nbytes / profile.bandwidth
    return wire + calls * profile.latency * (u - 1)


def predict_a2a(spec, schedule: str, P: int, profile: Profile, *, overlap: bool = True):
    """Predicted time of one all-to-all attention call (``cost_model.Prediction``): the inner
    ring's steps and imbalance, ``seconds`` including the all-to-all; ``notes`` has the split."""
    from .cost_model import AttentionSpec, Prediction, predict
    u = degree(schedule, P)
    G = P // u
    if spec.Hq % u:
        raise ValueError(f"{schedule} on {P} ranks needs the query heads ({spec.Hq}) divisible by {u}")
    R = spec.Hkv if spec.Hkv % u == 0 else math.lcm(spec.Hkv, u)
    inner_spec = AttentionSpec(B=spec.B, Hq=spec.Hq // u, Hkv=R // u, S=spec.S, D=spec.D, causal=spec.causal,
                               window=spec.window, dtype_bytes=spec.dtype_bytes, backward=spec.backward)
    n = profile.gpus_per_node
    crosses = profile.inter_node_bandwidth is not None and n is not None and P > n
    hop = min(profile.bandwidth, profile.inter_node_bandwidth) if crosses else profile.bandwidth
    inner_profile = replace(profile, bandwidth=hop, inter_node_bandwidth=None,
                            shared_cores=None if profile.shared_cores is None else profile.shared_cores / u)
    inner = predict(inner_spec, "zigzag" if G > 1 else "ring", G, inner_profile, overlap=overlap)
    fwd_b, bwd_b = a2a_bytes_per_rank(spec, schedule, P)
    # forward: q, k, v, (docs), out, lse; backward: dout in, dq, dk, dv out (one collective each)
    a2a = _a2a_seconds(fwd_b, u, P, profile, 5) + _a2a_seconds(bwd_b, u, P, profile, 4)
    ring_bytes = sum(s.bytes_sent[0] for s in inner.forward + inner.backward)
    notes = {"degree": u, "groups": G, "a2a_seconds": a2a, "attention_seconds": inner.seconds,
             "a2a_bytes_per_rank": fwd_b + bwd_b, "ring_bytes_per_rank": ring_bytes}
    # the steps are the ring's across the G groups: P of the prediction is G (the dump's schedule
    # table and picture show that ring); the all-to-all's degree and groups are in ``notes``
    return Prediction(schedule, overlap, G, spec, inner.forward, inner.backward, inner.seconds + a2a,
                      inner.imbalance, notes)
