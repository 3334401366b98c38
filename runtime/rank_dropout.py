"""Dropout on a shard of the sequence: each rank draws its own mask.

Why not the plain op on the local tensor: every rank of a group holds the same random state (the
user seeds them alike, so replicated values — weights at init, a per-sample drop-path mask — agree
across ranks). Dropout run as is on each rank's shard then draws the same mask on every rank, so
token t of rank 0 and token t of rank 1 are dropped together: every element is dropped with the
right probability, but the masks of the P shards are one mask repeated, which is not what one
device trains with.

Here the mask's generator is seeded from one draw of the default CPU generator (the same draw on
every rank, so the shared random state stays shared) mixed with the rank in the group: the
shards' masks are independent, each Bernoulli(1 - p), as on one device. Not bitwise equal to one
device's mask (no sharded run can be without drawing the whole sequence's mask); the gather
fallback of other random ops is (``runtime/sharding/ops.py``).

Shapes: x any shape (this rank's shard); returns (out like x, keep: bool like x).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .ring_op import resolve_group

__all__ = ["rank_dropout_op"]

# mixes the rank into the seed (a large odd constant: the golden-ratio increment of splitmix64)
_RANK_MIX = 0x9E3779B97F4A7C15
_SEED_BITS = (1 << 63) - 1


def _keep_mask(x: Tensor, p: float, group_name: str) -> Tensor:
    group = resolve_group(group_name)
    rank = 0 if group is None else dist.get_rank(group)
    seed = int(torch.randint(0, _SEED_BITS, (), dtype=torch.int64))        # same on every rank
    gen = torch.Generator(device=x.device)
    gen.manual_seed((seed + rank * _RANK_MIX) & _SEED_BITS)
    return torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32) >= p


@torch.library.custom_op("seqpar::rank_dropout", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def rank_dropout_op(x: Tensor, p: float, group_name: str) -> tuple[Tensor, Tensor]:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"seqpar: dropout probability must be in [0, 1]; got {p}")
    if p == 1.0:
        return torch.zeros_like(x), torch.zeros_like(x, dtype=torch.bool)
    keep = _keep_mask(x, p, group_name)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p)), keep


@rank_dropout_op.register_fake
def _(x, p, group_name):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


def _setup(ctx, inputs, output):
    _, p, _ = inputs
    ctx.p = p
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_keep):
    (keep,) = ctx.saved_tensors
    scale = 0.0 if ctx.p == 1.0 else 1.0 / (1.0 - ctx.p)
    return grad_out * keep.to(grad_out.dtype) * scale, None, None


rank_dropout_op.register_autograd(_backward, setup_context=_setup)
