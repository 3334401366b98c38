"""The ring schedule as data: which (query owner, KV owner) blocks each rank computes at each step,
and which transfers that needs. Every rank builds the same plan from the same static facts
(P, layout, local length, the spec's band of visible positions), so sends and receives always
pair up.

Blocks and steps (P ranks; "block (i, j)" = queries of rank i against keys/values of rank j):
  * KV blocks travel the ring one hop per step: at step t rank r holds rank (r−t) mod P's block.
    A block is forwarded only while a rank further along still needs it, so a causal ``ring``
    layout or a short sliding window sends less, and a step whose blocks are all empty sends
    nothing.
  * ``ring``, ``zigzag``, ``striped`` (and ``distflash`` without a causal mask): at step t rank r
    computes block (r, r−t) when it is not empty by position.
  * ``distflash`` with a causal mask (DistFlashAttn's load balancing): steps 0..⌊P/2⌋. At step t
    rank r ≥ t computes its own block (r, r−t); rank r < t would idle, so it *helps* rank
    h = P−t+r by computing block (h, r) with its own KV: h sends its queries ahead of the step
    and gets back (out, lse) to merge. Distances t and P−t are covered at step t.

            step 0        step 1              step 2 (P = 4: only distance 2, no help)
  rank 0   (0,0)         help (3,0)           -
  rank 1   (1,1)         (1,0)                -
  rank 2   (2,2)         (2,1)                (2,0)
  rank 3   (3,3)         (3,2)                (3,1)

Emptiness by per-token data (document ids, key padding) is data-dependent and is decided when
a block is computed; the plan sends every block that positions do not rule out.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from seqpar_compiler.kernels import AttentionSpec, BlockKind, BlockMask, classify_block

from .layout import local_segments

__all__ = ["RankStep", "RingPlan", "build_plan", "segment_mask"]


@dataclass(frozen=True)
class RankStep:
    """What one rank does at one step.

    holds        owner of the KV block this rank holds (None: it holds none)
    compute_own  compute block (this rank, holds)
    help_q       compute block (help_q, this rank) for another rank, with this rank's own KV
    forward_kv   send the held block to the next rank, for step t+1
    receive_kv   receive the next block from the previous rank, for step t+1
    q_to / q_from  queries to send / receive now, for a help task at step t+1
    """

    holds: int | None
    compute_own: bool
    help_q: int | None
    forward_kv: bool
    receive_kv: bool
    q_to: int | None
    q_from: int | None


@dataclass(frozen=True)
class RingPlan:
    """``steps[t][r]``; ``path_end[s]`` is the rank where block s's journey ends;
    ``helpers[h]`` lists (step, helper rank) that compute rank h's queries."""

    P: int
    steps: tuple[tuple[RankStep, ...], ...]
    path_end: tuple[int, ...]
    helpers: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def num_steps(self) -> int:
        return len(self.steps)


def segment_mask(q_seg, k_seg, spec: AttentionSpec, q_doc=None, k_doc=None, k_valid=None,
                 alibi_slopes=None, rel_bias=None, rel_bias_grad=None) -> BlockMask:
    """The block mask of one (query segment, key segment) pair: the spec, the segments' global
    positions and the per-token data of their rows (documents [B, M] / [B, N], key validity
    [B, N]), with the ALiBi slopes and relative-position table the kernels evaluate over those
    positions (and, in a backward, the learned table's gradient accumulator)."""
    return BlockMask(q_start=q_seg.start, q_stride=q_seg.stride, k_start=k_seg.start,
                     k_stride=k_seg.stride, spec=spec, q_doc=q_doc, k_doc=k_doc, k_valid=k_valid,
                     alibi_slopes=alibi_slopes, rel_bias=rel_bias, rel_bias_grad=rel_bias_grad)


def _needed(schedule: str, P: int, S_local: int, band: AttentionSpec) -> list[list[bool]]:
    segs = [local_segments(schedule, r, P, S_local) for r in range(P)]
    return [[any(classify_block(segment_mask(qs, ks, band), qs.count, ks.count)
                 is not BlockKind.EMPTY for qs in segs[i] for ks in segs[j])
             for j in range(P)] for i in range(P)]


def build_plan(schedule: str, P: int, S_local: int, spec: AttentionSpec) -> RingPlan:
    """The plan of one attention: only the spec's band matters (per-token data is decided per
    block, scores never empty a block), so every spec with one band shares one cached plan."""
    return _build_plan(schedule, P, S_local, AttentionSpec(behind=spec.behind, ahead=spec.ahead))


@lru_cache(maxsize=256)
def _build_plan(schedule: str, P: int, S_local: int, band: AttentionSpec) -> RingPlan:
    needed = _needed(schedule, P, S_local, band)
    own: dict[tuple[int, int], int] = {}        # (step, rank) -> kv owner
    helps: dict[tuple[int, int], int] = {}      # (step, helper rank) -> query owner
    # DistFlashAttn's help tasks assume no key after its query is needed (block (r, j) with
    # j > r is empty in a contiguous layout): causal bands only
    if schedule == "distflash" and band.ahead is not None and band.ahead <= 0:
        for t in range(P // 2 + 1):
            for r in range(P):
                if r >= t:
                    if needed[r][r - t]:
                        own[t, r] = r - t
                elif P - t != t and needed[P - t + r][r]:
                    helps[t, r] = P - t + r
    else:
        for t in range(P):
            for r in range(P):
                if needed[r][(r - t) % P]:
                    own[t, r] = (r - t) % P
    num_steps = 1 + max([t for t, _ in own] + [t for t, _ in helps] + [0])

    # Block s is at rank s+t at step t; it travels until its last use.
    last_use = [0] * P
    for (t, r), s in own.items():
        last_use[s] = max(last_use[s], t)
    steps = []
    for t in range(num_steps):
        row = []
        for r in range(P):
            s = (r - t) % P
            holds = s if t <= last_use[s] else None
            prev_s = (r - 1 - t) % P                     # what the previous rank holds now
            nxt = helps.get((t + 1, r))
            q_to = next((hr for (ht, hr), hq in helps.items() if ht == t + 1 and hq == r), None)
            row.append(RankStep(
                holds=holds,
                compute_own=(t, r) in own,
                help_q=helps.get((t, r)),
                forward_kv=holds is not None and t < last_use[s],
                receive_kv=t + 1 <= last_use[prev_s] and t + 1 < num_steps,
                q_to=q_to,
                q_from=nxt,
            ))
        steps.append(tuple(row))
    path_end = tuple((s + last_use[s]) % P for s in range(P))
    helpers = tuple(tuple(sorted((t, hr) for (t, hr), hq in helps.items() if hq == h)) for h in range(P))
    return RingPlan(P=P, steps=tuple(steps), path_end=path_end, helpers=helpers)
