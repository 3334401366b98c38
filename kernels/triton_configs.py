"""Tile sizes, warps and pipeline stages of the Triton attention kernels, per GPU, head dim and dtype.

Why a table and not ``triton.autotune``: autotuning times every candidate on the first call of
each shape and keeps the fastest, so the choice depends on timing noise — two ranks of one ring
may pick different tiles (bitwise different block results) and the first step of every new
shard length pays the search. The ring calls these kernels with many block shapes, so the choice
here is a pure function of (GPU generation, padded head dim, dtype, which pass), cached, and the
same on every rank and every run. ``candidate_configs`` is the search space to time on a GPU
when one is at hand, so the table can be checked against measurement there (not done yet: no
GPU session so far).

Where the entries come from (published practice, not our own tuning — no GPU session is long
enough to search):
  * forward, fp16/bf16: FlexAttention's per-GPU defaults (``h100_default_flex_config`` and
    ``a100_default_flex_config`` in ``torch/_inductor/template_heuristics/triton.py``);
  * backward, fp16/bf16: FlexAttention's backward defaults (sm90: (64, 128, 128, 64), 3 stages,
    8 warps up to D=128; sm8x: (64, 64, 64, 64), 2 stages, 4 warps); Triton's fused-attention
    tutorial uses the same split (dk/dv: narrow query tiles against wide key tiles, dq the
    transpose);
  * fp32: our kernels keep fp32 exact (``ieee`` dots, no TF32), which needs far more registers
    than tensor-core dots; the tiles are the ones chosen from ptxas resource usage on sm_80
    (no or < 100 B of spills per thread).
The Triton interpreter (CPU tensors, ``TRITON_INTERPRET=1``) runs each tile op as one numpy
call: one small config there, whatever the dtype.

Shape legend: D_PAD = max(16, next power of two ≥ D) (the kernels' padded head dim); a
config's BLOCK_M / BLOCK_N are query / key rows of one tile of that pass.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["TileConfig", "TritonConfigs", "candidate_configs", "gpu_class", "triton_configs"]


@dataclass(frozen=True)
class TileConfig:
    """One pass's launch parameters: query rows, key rows per tile, warps, software-pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class TritonConfigs:
    """The configs of the three passes of one (GPU, D_PAD, dtype): forward, dK/dV, dQ.

    The backward preprocess (delta = rowsum(dO·O)) runs with the dQ pass's query tiles.
    """

    forward: TileConfig
    dkdv: TileConfig
    dq: TileConfig


_INTERPRETER = TritonConfigs(TileConfig(64, 64, 4, 1), TileConfig(64, 64, 4, 1), TileConfig(64, 64, 4, 1))

# FlexAttention's forward defaults: (GPU class, dtype, D_PAD) → (BLOCK_M, BLOCK_N, warps, stages)
_FWD_HALF = {
    ("sm90", 64): TileConfig(128, 128, 4, 3),
    ("sm90", 128): TileConfig(128, 64, 8, 3),
    ("sm90", 256): TileConfig(64, 32, 4, 3),
    ("sm8x", 64): TileConfig(128, 64, 4, 3),
    ("sm8x", 128): TileConfig(128, 64, 8, 3),
    ("sm8x", 256): TileConfig(32, 64, 4, 3),
}


def gpu_class(capability: tuple[int, int] | None) -> str:
    """``sm90`` (Hopper and newer), ``sm8x`` (Ampere, Ada) or ``older`` (or no GPU: ``None``)."""
    if capability is None:
        return "older"
    if capability[0] >= 9:
        return "sm90"
    return "sm8x" if capability[0] >= 8 else "older"


def _half_configs(cls: str, d_pad: int) -> TritonConfigs:
    d_key = 64 if d_pad <= 64 else 128 if d_pad <= 128 else 256
    if cls == "older":
        fwd = TileConfig(64, 32, 4, 2)
        return TritonConfigs(fwd, TileConfig(32, 32, 4, 1), TileConfig(32, 32, 4, 1))
    fwd = _FWD_HALF[(cls, d_key)]
    if cls == "sm90" and d_key <= 128:
        # dk/dv: 64 query rows × 128 key rows; dq: 128 query rows × 64 key rows
        return TritonConfigs(fwd, TileConfig(64, 128, 8, 3), TileConfig(128, 64, 8, 3))
    stages = 2 if d_key <= 128 else 1
    return TritonConfigs(fwd, TileConfig(64, 64, 4, stages), TileConfig(64, 64, 4, stages))


def _fp32_configs(d_pad: int) -> TritonConfigs:
    if d_pad <= 64:
        tile = TileConfig(32, 32, 8, 2)
    elif d_pad <= 128:
        tile = TileConfig(32, 16, 8, 2)
    else:
        tile = TileConfig(16, 16, 8, 1)
    return TritonConfigs(tile, tile, tile)


@functools.lru_cache(maxsize=None)
def _configs(cls: str, d_pad: int, dtype: torch.dtype) -> TritonConfigs:
    if dtype == torch.float32:
        return _fp32_configs(d_pad)
    return _half_configs(cls, d_pad)


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def triton_configs(d_pad: int, dtype: torch.dtype, device: torch.device) -> TritonConfigs:
    """The launch configs for a block of padded head dim ``d_pad`` and ``dtype`` on ``device``.

    Deterministic and cached: the same answer on every rank, every call, every run.
    """
    if device.type != "cuda":
        return _INTERPRETER
    return _configs(gpu_class(_capability(device)), d_pad, dtype)


def candidate_configs(d_pad: int, dtype: torch.dtype) -> list[TileConfig]:
    """The forward search space to time on a GPU: FlexAttention's
    max-autotune forward list plus Triton's tutorial space (BLOCK_M 64/128, BLOCK_N 32/64/128,
    2–4 stages, 4 or 8 warps), trimmed to tiles whose fp32 accumulator fits at this head dim."""
    if dtype == torch.float32:
        return [_fp32_configs(d_pad).forward, TileConfig(32, 32, 4, 2), TileConfig(16, 16, 4, 2)]
    space = [TileConfig(m, n, w, s) for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]
    if d_pad > 128:
        space = [c for c in space if c.block_m * c.block_n <= 64 * 64]
    return space
