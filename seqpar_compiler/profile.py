"""Cost-model profiles: what one rank computes per second and what a ring hop moves (docs/architecture.md).

A profile is either *shipped* (GPU clusters, ``profiles/gpu_clusters.toml``, sources in its
comments), a JSON file, or *calibrated* on this machine by ``calibrate()`` and cached under the
user's cache folder (``$XDG_CACHE_HOME/seqpar`` or ``~/.cache/seqpar``), so a compile with
``SEQPAR_SCHEDULE=auto`` measures once per machine and torch version.

Calibration is collective: group rank 0 times the block attention kernel, ranks 0 and 1 time a
ring-style exchange, and rank 0 broadcasts the result, so every rank holds the same profile.
Measured under load (other processes on the cores) the figures come out low; re-run
``python -m seqpar_compiler.cost_model calibrate`` on a quiet machine.
"""
from __future__ import annotations

import json
import os
import socket
import time
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from .runtime.control import control_all_reduce_max, control_barrier, control_broadcast_object, control_device

__all__ = ["Profile", "shipped_profiles", "load_profile", "calibrate", "cache_path", "PROFILE_CHOICES"]

_SHIPPED_FILE = Path(__file__).parent / "profiles" / "gpu_clusters.toml"
PROFILE_CHOICES = "a shipped profile (a100-dgx, h100-dgx), a profile .json file, or unset (calibrated, cached)"


@dataclass(frozen=True, kw_only=True)
class Profile:
    """Machine figures the roofline model needs. FLOPs use the stats convention: 4·B·Hq·D per
    (query, key) pair, which is the real forward attention FLOP count."""

    name: str
    description: str = ""
    flops_per_second: float          # forward block attention, one rank alone, full blocks
    backward_ratio: float            # backward seconds / forward seconds for the same pairs
    causal_extra_rows: float = 0.0   # a causal tile of T rows costs T·(T/2 + this) pairs
    call_overhead: float = 0.0       # seconds per block kernel call (launch, wrapper, merge)
    bandwidth: float                 # bytes/s a rank sends to its ring neighbour, all sending at once
    inter_node_bandwidth: float | None = None   # the slowest hop once the ring leaves a node
    gpus_per_node: int | None = None
    latency: float = 0.0             # seconds per message
    step_overhead: float = 0.0       # seconds per ring step besides kernels and wire (Python, posting, waits)
    merge_seconds_per_element: float = 0.0   # merging a block's (out, lse) into the running result, per out element
    shared_cores: int | None = None  # CPU: the ranks share these cores; None: a device per rank
    threads_per_rank: int = 1
    concurrency_slowdown: float = 1.0   # per-core slowdown once every shared core computes at once
    overlap_efficiency: float = 1.0  # share of the shorter of (compute, transfer) hidden by overlap
    tiles: str = "aten"              # "aten": masked tiles cost their rectangle; "visible": visible pairs

    def ring_bandwidth(self, P: int) -> float:
        """Bytes/s of the slowest hop of a ring of P ranks."""
        if self.inter_node_bandwidth is not None and self.gpus_per_node and P > self.gpus_per_node:
            return min(self.bandwidth, self.inter_node_bandwidth)
        return self.bandwidth

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown profile field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(**data)


def shipped_profiles() -> dict[str, Profile]:
    """The GPU-cluster profiles shipped with the package, by name."""
    with open(_SHIPPED_FILE, "rb") as f:
        data = tomllib.load(f)
    return {name: Profile.from_dict({"name": name, **fig}) for name, fig in data.items()}


def cache_path() -> Path:
    """Where this machine's calibrated profile is cached (one per host and torch version)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "seqpar" / f"profile-{socket.gethostname()}-torch{torch.__version__}.json"


def load_profile(name: str | None) -> Profile | None:
    """The profile ``name`` names (``SEQPAR_PROFILE``): a shipped name or a JSON file; with no
    name, the cached calibration of this machine, or None when there is none yet."""
    if not name:
        path = cache_path()
        if not path.exists():
            return None
        try:
            return Profile.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError):   # written by another seqpar version: measure again
            return None
    shipped = shipped_profiles()
    if name in shipped:
        return shipped[name]
    if os.path.isfile(name):
        return Profile.from_dict(json.loads(Path(name).read_text()))
    raise ValueError(f"unknown cost-model profile {name!r} (SEQPAR_PROFILE); allowed: {', '.join(shipped)}, "
                     f"or the path of a profile .json file (written by `python -m seqpar_compiler.cost_model "
                     f"calibrate --out FILE`)")


def _save(profile: Profile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(profile.as_dict(), indent=2))
    os.replace(tmp, path)            # atomic: concurrent calibrations never leave half a file


def _best_seconds(fn, reps: int) -> float:
    fn()                             # warm-up (allocations, first-call dispatch)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _measure_compute(reps: int) -> dict:
    """Time the block kernels the ring calls: two full sizes (rate and per-call overhead),
    a causal block (the diagonal's extra cost) and the backward of the larger full block."""
    from seqpar_compiler.kernels import block_attention_backward
    B, H, D = 1, 8, 64
    g = torch.Generator().manual_seed(0)

    def block(M, causal):
        return _block(M, causal, g)

    small, large = 256, 1024
    flops = lambda M: 4 * B * H * D * M * M           # noqa: E731
    t_small = _best_seconds(block(small, False)[0], reps)
    fwd_large, (q, k, v, dout, mask) = block(large, False)
    t_large = _best_seconds(fwd_large, reps)
    rate = (flops(large) - flops(small)) / max(t_large - t_small, 1e-9)
    overhead = max(0.0, t_small - flops(small) / rate)
    out, lse = fwd_large()
    t_bwd = _best_seconds(lambda: block_attention_backward(dout, q, k, v, out, lse, mask, D ** -0.5, "aten"), reps)
    t_causal = _best_seconds(block(large, True)[0], reps)
    # t_causal - overhead = M·(M/2 + extra) pairs at the full rate
    extra = max(0.0, ((t_causal - overhead) * rate / (4 * B * H * D) - large * large / 2) / large)
    from seqpar_compiler.runtime.ring import merge_partial_attention
    o, o_b = torch.randn(B, H, large, D, generator=g), torch.randn(B, H, large, D, generator=g)
    l, l_b = torch.randn(B, H, large, generator=g), torch.randn(B, H, large, generator=g)
    t_merge = _best_seconds(lambda: merge_partial_attention(o.clone(), l.clone(), o_b, l_b), reps)
    return {"flops_per_second": rate, "call_overhead": overhead, "causal_extra_rows": extra,
            "merge_seconds_per_element": t_merge / o.numel(),
            "backward_ratio": max(1.0, (t_bwd - overhead) / max(t_large - overhead, 1e-9))}


def _block(M: int, causal: bool, g: torch.Generator):
    """(forward call of one [1, 8, M, 64] block, its tensors) for timing."""
    from seqpar_compiler.kernels import AttentionSpec, BlockMask, block_attention_forward
    q, k, v, dout = (torch.randn(1, 8, M, 64, generator=g) for _ in range(4))
    mask = BlockMask(spec=AttentionSpec.of(causal=causal))
    return (lambda: block_attention_forward(q, k, v, mask, 64 ** -0.5, "aten")), (q, k, v, dout, mask)


def _measure_concurrency(group, reps: int, cores: int) -> float:
    """How much slower a core computes when every core of the host computes: rank 0 times a block
    alone, then together with the ranks that fit the cores, in alternating rounds; the median
    ratio of the rounds (other processes' load comes and goes between measurements)."""
    rank, busy = dist.get_rank(group), min(dist.get_world_size(group), cores)
    fwd = _block(1024, False, torch.Generator().manual_seed(0))[0]
    ratios = []
    for _ in range(max(3, reps)):
        control_barrier(group)
        alone = _best_seconds(fwd, 2) if rank == 0 else None
        control_barrier(group)
        together = _best_seconds(fwd, 2) if rank < busy else None
        if rank == 0:
            ratios.append(together / alone)
    control_barrier(group)
    return max(1.0, sorted(ratios)[len(ratios) // 2]) if rank == 0 else 1.0


def _measure_link(group, reps: int) -> dict:
    """Ranks 0 and 1 exchange buffers both ways at once, as ring neighbours do."""
    rank = dist.get_rank(group)
    peer = dist.get_global_rank(group, 1 - rank)

    def exchange(numel):
        send, recv = torch.ones(numel), torch.empty(numel)
        ops = [dist.P2POp(dist.isend, send, peer, group), dist.P2POp(dist.irecv, recv, peer, group)]
        if rank == 1:
            ops.reverse()
        return lambda: [w.wait() for w in dist.batch_isend_irecv(ops)]
    big = 4 * 1024 * 1024                            # 16 MB of fp32: a KV block at S_local≈4k, H=8, D=64
    t_small = _best_seconds(exchange(1), 4 * reps)
    t_big = _best_seconds(exchange(big), reps)
    return {"latency": t_small, "bandwidth": 4 * big / max(t_big - t_small, 1e-9)}


def _measure_step_overhead(group, reps: int, latency: float) -> float:
    """A tiny ring call (no compute to speak of): what each step costs beyond kernels and wire."""
    from .api import ring_attention
    P = dist.get_world_size(group)
    q = torch.randn(1, 1, 16, 8, requires_grad=True)

    def call():
        ring_attention(q, q, q, schedule="ring", group=group).sum().backward()
    # the call ends with the slowest rank
    seconds = control_all_reduce_max(torch.tensor([_best_seconds(call, 2 * reps)]), group)
    return max(0.0, seconds.item() / (2 * P) - 2 * latency)        # P steps forward, P backward


def calibrate(group: dist.ProcessGroup | None = None, *, save: bool = True, reps: int = 3) -> Profile:
    """Measure this machine's attention FLOP rate and ring link, cache it, return the profile.

    Collective over ``group`` (default: the default group). Without a process group, two
    one-thread gloo ranks are spawned to measure the link. Every rank returns the same profile.
    The attention it times is not counted by an open ``seqpar_compiler.stats()``.
    """
    from .runtime.stats import not_counted
    with not_counted():
        return _calibrate(group, save=save, reps=reps)


def _calibrate(group: dist.ProcessGroup | None, *, save: bool, reps: int) -> Profile:
    if not (dist.is_available() and dist.is_initialized()):
        from .launch import run_ranks
        figures = run_ranks(_calibrate_worker, 2, reps, timeout=600)[0]
        profile = Profile.from_dict(figures)
    else:
        group = group or dist.group.WORLD
        if control_device(group).type != "cpu":
            raise ValueError(f"seqpar: calibration times the CPU kernels over a CPU (gloo) group; this group serves "
                             f"{control_device(group).type} tensors. Name a GPU profile instead: SEQPAR_PROFILE="
                             f"{' or '.join(n for n in shipped_profiles() if 'dgx' in n) or 'a .json file'}")
        rank, P = dist.get_rank(group), dist.get_world_size(group)
        figures = {}
        if rank == 0:
            figures.update(_measure_compute(reps))
        if P > 1:
            control_barrier(group)                # compute timed alone, then the link
            if rank < 2:
                figures.update(_measure_link(group, reps))
            latency = control_broadcast_object(figures.get("latency", 0.0), group)
            figures["step_overhead"] = _measure_step_overhead(group, reps, latency)
            slowdown = _measure_concurrency(group, reps, len(os.sched_getaffinity(0)))
            if rank == 0:
                figures["concurrency_slowdown"] = slowdown
        if rank == 0:
            # CPU ranks of one host share its cores; gloo's copies compete with compute for
            # them, so overlap hides only part of a transfer (0.5: a guess the bench checks).
            figures.update(name=f"calibrated:{socket.gethostname()}", tiles="aten",
                           description=f"calibrated on {socket.gethostname()} (CPU, {torch.get_num_threads()} "
                                       f"thread(s) per rank, {time.strftime('%Y-%m-%d')})",
                           shared_cores=len(os.sched_getaffinity(0)), threads_per_rank=torch.get_num_threads(),
                           overlap_efficiency=0.5)
            if P == 1:
                figures.update(bandwidth=float("inf"), latency=0.0)
        profile = Profile.from_dict(control_broadcast_object(figures, group) if P > 1 else figures)
    if save and (not dist.is_initialized() or dist.get_rank() == 0):
        _save(profile, cache_path())
    return profile


def _calibrate_worker(rank: int, world: int, reps: int) -> dict:
    return calibrate(save=False, reps=reps).as_dict()
