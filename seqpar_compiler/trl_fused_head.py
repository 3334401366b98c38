"""TRL's fused LM head on sequence shards: each rank scores its own tokens.

TRL's ``SFTTrainer`` always adds a fused LM head (``trl.trainer.utils.add_fused_lm_head``): the
backbone's hidden states, cut to ``hidden[:, :-1]``, go through ``ChunkedLogProbFunction``, an
eager ``autograd.Function`` that projects tiles of tokens through the LM head into full-size
buffers (``torch.mm(..., out=tile)``) and folds them into per-token log-probabilities. Dynamo
breaks the graph before it, so the hidden states reach it as a part of the sequence
(a ``SequenceShard``), and its ``out=`` writes into plain buffers gather them: every rank would
project every token.

The function is per token: row i of every output depends on row i of the hidden states and of
the targets only, and the weight's gradient is a sum over tokens. So on a shard it runs on this
rank's rows, with the targets cut to the same rows, and the weight's (and bias's) gradient is
summed over the group (``sum_grad_over_group``; left partial under ``SEQPAR_GRAD_REDUCE=none``); its
per-token outputs are shards of the same rows. TRL's compact form (``hidden[mask]``, chosen on
Triton devices) would select rows across ranks first, so while the head is replaced the full
form is chosen (every position scored, the masked ones zeroed after: the same values, a little
more work on the masked positions).

This replaces two names of ``trl.trainer.utils`` for as long as a seqpar trainer computes a loss
(``SequenceParallelMixin.compute_loss``), and restores them after: the one place seqpar changes
a library's module, because the function gives no other hook (an ``autograd.Function`` has no
``__torch_function__`` path).

Shape legend: N = B·(S−1) tokens scored (merged batch × sequence), H hidden size, V vocabulary;
this rank holds n of the N rows.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .runtime.grad_collectives import sum_grad_over_group
from .runtime.sequence_shard import SequenceShard, ShardSpec, from_local, slice_local, to_local

__all__ = ["fused_head_on_shards"]


def _grad_summed(x: Tensor | None, spec: ShardSpec):
    """``x`` used by each rank's own tokens: its gradient summed over the group (each rank's is
    its tokens' part of the sum), or left partial under ``SEQPAR_GRAD_REDUCE=none``, as the
    compiled frames leave a replicated weight's."""
    if x is None or spec.grad_reduce == "none" or spec.P == 1:
        return x
    return sum_grad_over_group(x, spec.group_name)


def _rows(value, spec: ShardSpec):
    """``value`` ([N, ...]) as this rank's rows of ``spec``: a shard's local tensor, a plain
    tensor cut like it."""
    if isinstance(value, SequenceShard):
        return to_local(value, spec)
    return slice_local(value, spec)


def _on_shards(function):
    @torch._disable_dynamo
    def apply(hidden, weight, bias, targets, *rest):
        """``function.apply`` on this rank's rows when ``hidden`` ([N, H]) is a shard of its rows."""
        if not (isinstance(hidden, SequenceShard) and hidden.dim() == 2 and hidden.spec.dim == 0
                and isinstance(targets, Tensor) and targets.dim() == 1 and targets.shape[0] == hidden.shape[0]):
            return function.apply(hidden, weight, bias, targets, *rest)
        spec = hidden.spec
        outs = function.apply(to_local(hidden), _grad_summed(weight, spec), _grad_summed(bias, spec),
                              _rows(targets, spec), *rest)
        return tuple(None if o is None else from_local(o, spec) for o in outs)
    return apply


@contextlib.contextmanager
def fused_head_on_shards():
    """While open, TRL's fused LM head scores each rank's own tokens (module docstring); a no-op
    without TRL or with a TRL that has no fused head."""
    try:
        from trl.trainer import utils
    except ImportError:
        yield
        return
    function = getattr(utils, "_ChunkedLogProbFunction", None)
    if function is None or not hasattr(utils, "_use_triton"):
        yield
        return
    saved = utils._ChunkedLogProbFunction, utils._use_triton
    utils._ChunkedLogProbFunction = type("ChunkedLogProbOnShards", (), {"apply": staticmethod(_on_shards(function))})
    utils._use_triton = lambda device: False          # the full form: no selection across ranks
    try:
        yield
    finally:
        utils._ChunkedLogProbFunction, utils._use_triton = saved
