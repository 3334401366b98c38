"""Check that every rank of a sequence-parallel group passes the same batch (docs/architecture.md).

Transparent mode is only right if all ranks compute on the same inputs; a ``DistributedSampler``
over the sequence group is the usual way to break that. Per call: a few numbers per input
tensor (shape, a plain sum and a position-weighted sum, so a permutation is caught too) and one
tiny all-reduce of (v, -v) with MAX, which yields both the max and the min across ranks.
Parameters are not inputs of the batch and are skipped; complex tensors are compared by both
parts; fake or meta inputs (graph pieces under DDP's optimizer) have no values and skip the
check. The two all-reduces run on the group's device (``runtime/control.py``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from .runtime.control import control_all_reduce_max

__all__ = ["check_same_inputs", "InputMismatchError", "inputs_have_data"]


class InputMismatchError(ValueError):
    """Ranks of one sequence-parallel group passed different inputs."""


def _real_view(t: torch.Tensor) -> torch.Tensor:
    """Both parts of a complex tensor (``freqs_cis``) as a real one; casting a complex tensor to
    float64 would warn on every call and drop the imaginary part."""
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


def _has_no_data(t: torch.Tensor) -> bool:
    """Fake or meta tensors (DDPOptimizer calls the backend on graph pieces whose example
    inputs are fake): no values to fingerprint, and reading one would fail."""
    from torch._subclasses.fake_tensor import is_fake
    return t.is_meta or is_fake(t)


# elements summed at a time: a per-block frame's input is a full-length activation (FSDP2's eager
# root), and float64 copies of all of it were 6x its fp32 size at the step's peak
_CHUNK = 1 << 18


def _sums(flat: torch.Tensor) -> tuple[float, float]:
    """The plain and the position-weighted (1 + i mod 97) float64 sums of ``flat``, chunk by chunk."""
    weights = 1.0 + torch.arange(_CHUNK + 97, dtype=torch.float64, device=flat.device).remainder_(97)
    total = weighted = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK].to(torch.float64)
        total = total + part.sum()
        weighted = weighted + (part * weights[start % 97:start % 97 + part.numel()]).sum()
    return float(total), float(weighted)


def _fingerprint(args: Sequence[Any]) -> torch.Tensor:
    values: list[float] = []
    for arg in args:
        if isinstance(arg, torch.nn.Parameter):
            continue
        if isinstance(arg, torch.Tensor):
            values += [float(arg.dim()), float(arg.numel()), *_sums(_real_view(arg.detach()).reshape(-1))]
        elif isinstance(arg, (int, float, bool)):
            values.append(float(arg))
    return torch.tensor(values or [0.0], dtype=torch.float64)


def inputs_have_data(args: Sequence[Any]) -> bool:
    """False if any tensor input is fake or meta: then there is no batch to compare."""
    return not any(isinstance(a, torch.Tensor) and _has_no_data(a) for a in args)


def check_same_inputs(args: Sequence[Any], group: dist.ProcessGroup, hint: str = "") -> None:
    """Raise ``InputMismatchError`` on every rank if the ranks of ``group`` passed different inputs.

    Skipped (no collective) when the inputs are fake or meta tensors: every rank of the group
    sees the same kind of call there, so all of them skip alike.
    """
    if not inputs_have_data(args):
        return
    fp = _fingerprint(args)
    size = control_all_reduce_max(torch.tensor([float(fp.numel())], dtype=torch.float64), group)
    if int(size.item()) != fp.numel():
        raise InputMismatchError("seqpar: ranks of the sequence-parallel group passed different numbers of "
                                 "inputs; every rank must pass the same full batch")
    both = control_all_reduce_max(torch.cat([fp, -fp]), group)
    hi, lo = both[:fp.numel()], -both[fp.numel():]
    if not torch.allclose(hi, lo, rtol=1e-12, atol=0.0):
        raise InputMismatchError(
            "seqpar: ranks of the sequence-parallel group passed different inputs. In transparent mode "
            "every rank must pass the same full batch (a DistributedSampler over the sequence group is "
            "the usual cause: shard data across data-parallel groups only). Set SEQPAR_CHECK_INPUTS=0 "
            "to skip this check" + hint)
