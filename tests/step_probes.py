"""What a training step did on this rank, for the multi-process tests (issue 13).

- ``full_length_saves``: the tensors saved for the backward (``saved_tensors_hooks``) with a dim
  of the whole sequence length, other than the user's inputs. The pack hook reads storage
  pointers, which a FakeTensor refuses: it also pins that compilation runs none of the user's
  hooks on example values (it did: HF's mask went unproved, attention ran replicated).
- ``SequenceGatherCounter``: ``dist.all_gather`` calls on floating-point tensors of 2 dims or
  more: activations and their gradients (what ``gather_sequence`` and the backward of
  ``shard_sequence`` call). Control traffic gathers small vectors, and Ulysses gathers each
  layer's per-token integer data (document ids, key validity: ``[B, S]``, no hidden dim) by
  design; neither is the sequence's activations.
- ``grad_errors``: every parameter's gradient against the same parameter of a reference model.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["full_length_saves", "SequenceGatherCounter", "grad_errors"]


def full_length_saves(step, inputs, S: int):
    """(shapes of saved tensors with a dim of S that are not ``inputs``, ``step()``'s result)."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    found = []

    def pack(t):
        if isinstance(t, torch.Tensor) and S in t.shape and t.untyped_storage().data_ptr() not in own:
            found.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    return found, out


class SequenceGatherCounter:
    """Counts sequence all-gathers made while active."""

    def __enter__(self):
        self.calls, self._orig = 0, dist.all_gather

        def counting(tensor_list, tensor, *args, **kwargs):
            if tensor.dim() >= 2 and tensor.is_floating_point():
                self.calls += 1
            return self._orig(tensor_list, tensor, *args, **kwargs)
        dist.all_gather = counting
        return self

    def __exit__(self, *exc):
        dist.all_gather = self._orig


def grad_errors(model: torch.nn.Module, ref: torch.nn.Module) -> tuple[dict, list]:
    """({name: ||g - g_ref|| / ||g_ref||} in float64 for every parameter the reference gave a
    gradient, [names of those the model gave none]); the two models list their parameters alike.
    A reference gradient of norm 0 gives the absolute error."""
    errors, missing = {}, []
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is None:
            continue
        if p.grad is None:
            missing.append(name)
            continue
        a, b = p.grad.detach().double(), q.grad.detach().double()
        norm = float(b.norm())
        errors[name] = float((a - b).norm()) / (norm if norm else 1.0)
    return errors, missing
