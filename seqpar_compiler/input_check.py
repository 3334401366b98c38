"""Check that every rank of a sequence-parallel group passes the same batch (DESIGN §1).

Transparent mode is only right if all ranks compute on the same inputs; a ``DistributedSampler``
over the sequence group is the usual way to break that. Per call: a few numbers per input
tensor (shape, a plain sum and a position-weighted sum, so a permutation is caught too) and one
tiny all-reduce of (v, -v) with MAX, which yields both the max and the min across ranks.
Parameters are not inputs of the batch and are skipped.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from .runtime.stats import record

__all__ = ["check_same_inputs", "InputMismatchError"]


class InputMismatchError(ValueError):
    """Ranks of one sequence-parallel group passed different inputs."""


def _fingerprint(args: Sequence[Any]) -> torch.Tensor:
    values: list[float] = []
    for arg in args:
        if isinstance(arg, torch.nn.Parameter):
            continue
        if isinstance(arg, torch.Tensor):
            flat = arg.detach().reshape(-1).to(torch.float64)
            weights = 1.0 + torch.arange(flat.numel(), dtype=torch.float64, device=flat.device).remainder_(97)
            values += [float(arg.dim()), float(arg.numel()), float(flat.sum()), float((flat * weights).sum())]
        elif isinstance(arg, (int, float, bool)):
            values.append(float(arg))
    return torch.tensor(values or [0.0], dtype=torch.float64)


def check_same_inputs(args: Sequence[Any], group: dist.ProcessGroup) -> None:
    """Raise ``InputMismatchError`` on every rank if the ranks of ``group`` passed different inputs."""
    fp = _fingerprint(args)
    both = torch.cat([fp, -fp])
    size = torch.tensor([float(fp.numel())], dtype=torch.float64)
    dist.all_reduce(size, op=dist.ReduceOp.MAX, group=group)
    if int(size.item()) != fp.numel():
        raise InputMismatchError("seqpar: ranks of the sequence-parallel group passed different numbers of "
                                 "inputs; every rank must pass the same full batch")
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    record(control_bytes=(both.numel() + 1) * 8 * 2)
    hi, lo = both[:fp.numel()], -both[fp.numel():]
    if not torch.allclose(hi, lo, rtol=1e-12, atol=0.0):
        raise InputMismatchError(
            "seqpar: ranks of the sequence-parallel group passed different inputs. In transparent mode "
            "every rank must pass the same full batch (a DistributedSampler over the sequence group is "
            "the usual cause: shard data across data-parallel groups only). Set SEQPAR_CHECK_INPUTS=0 "
            "to skip this check")
