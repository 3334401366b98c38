"""The Hugging Face training stack on sequence groups: Trainer, TRL, accelerate, plain loops.

A sequence group's ranks must see the same batch (transparent mode), and groups must see
different ones (data parallelism across groups). Every Hugging Face client shards data by rank,
so each rank gets its own batch, and each wraps the model in DDP over the whole world, which then
averages gradients seqpar has already summed. This module closes both gaps through the clients'
public extension points (the one library name it replaces, while a loss is computed, is TRL's
fused LM head: ``trl_fused_head.py``):

  * ``sequence_parallel(Trainer)`` (or ``SequenceParallelMixin`` first in the bases): any
    ``transformers.Trainer`` subclass, TRL's ``SFTTrainer`` included, whose loaders give every
    rank of a group the same batches, whose DDP reduces over the data-parallel ranks only, whose
    evaluation counts each sample once, and whose collator pads to a length every schedule splits.
  * ``prepare(accelerator, model, optimizer, loader)``: ``accelerator.prepare`` plus the same for
    a hand-written accelerate loop; ``gather_for_metrics`` de-duplicates its evaluation.
  * ``group_data_parallel()`` / ``data_parallel_group()``: the ``DistributedSampler`` arguments
    and the DDP process group of a plain loop.

Groups are consecutive blocks of ``SEQPAR_DEGREE`` ranks (the whole world by default), as the
backend makes them: group ``g`` is ranks ``g·P … g·P+P−1``; its data-parallel index is ``g``.

Why not accelerate's ``ParallelismConfig`` as the group source: its ``cp_size`` does give every
rank of a ``cp`` sub-mesh the same batch, but it also switches on torch's own context
parallelism (inputs sharded in place before the model sees them, the attention mask replaced by
``is_causal``, FSDP2 required, SDPA only), which TRL refuses with packing; ``tp_size`` and
``sp_size`` switch on tensor parallelism and DeepSpeed's Ulysses. None of them can name a group
without parallelising the model a second way.

The compiled model is made before the trainer, ``model.compile(backend="seqpar")``: TRL replaces
``forward`` on the object it is given, which bypasses the wrapper ``torch.compile(model)``
returns; ``model.compile`` compiles the call itself, so the replaced forward runs compiled.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

__all__ = ["DataParallelPosition", "SequenceParallelMixin", "data_parallel_group", "gather_for_metrics",
           "group_data_parallel", "prepare", "same_batch_per_group", "sequence_parallel"]

log = logging.getLogger("seqpar")


class DataParallelPosition(NamedTuple):
    """This rank's place among the data-parallel replicas: ``DistributedSampler(ds, *position)``."""

    num_replicas: int
    rank: int


def _degree(degree: int | None) -> int:
    from .options import get_option
    world = dist.get_world_size()
    P = degree if degree is not None else (get_option("degree") or world)
    if P < 1 or world % P:
        raise ValueError(f"seqpar: a sequence degree of {P} must divide the world size {world} "
                         f"(SEQPAR_DEGREE or degree=)")
    return P


def group_data_parallel(degree: int | None = None) -> DataParallelPosition:
    """(number of sequence groups, this rank's group): every rank of a group gets the same position.

    ``degree`` ranks per group (default ``SEQPAR_DEGREE``, else the whole world). Without a
    process group: ``(1, 0)``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return DataParallelPosition(1, 0)
    P = _degree(degree)
    return DataParallelPosition(dist.get_world_size() // P, dist.get_rank() // P)


_dp_groups: dict[tuple[int, int], Any] = {}


def data_parallel_group(degree: int | None = None) -> dist.ProcessGroup:
    """The ranks that hold the same position in every sequence group (``r, r+P, r+2P, …``): what
    DDP spans in a plain loop, ``DDP(model, process_group=data_parallel_group())``. Collective:
    every rank must call it (the groups are made on first use and cached)."""
    P, world = _degree(degree), dist.get_world_size()
    key = (world, P)
    if key not in _dp_groups:
        mine = None
        for j in range(P):
            group = dist.new_group(list(range(j, world, P)))
            if dist.get_rank() % P == j:
                mine = group
        _dp_groups[key] = mine
    return _dp_groups[key]


def same_batch_per_group(loader, *, degree: int | None = None):
    """An accelerate-prepared loader re-pointed from one shard per rank to one shard per group.

    ``accelerator.prepare`` (and so ``Trainer``) splits the data over every process; this gives
    the ranks of a sequence group the same batches and the groups different ones, in the order one
    process with the groups' batches side by side would see them (accelerate's seedable sampler
    makes the permutation the same on every rank). Returns the same loader object. The shard
    fields are the ones transformers' own ``Trainer`` resets for its rank-aware samplers.

    Raises:
        ValueError: a dispatching loader (``dispatch_batches=True``: rank 0 reads and scatters
            slices, so there is no per-rank shard to re-point).
        TypeError: not an accelerate-prepared loader (build a plain one with
            ``DistributedSampler(ds, *group_data_parallel())``).
    """
    position = group_data_parallel(degree)
    if not (dist.is_available() and dist.is_initialized()) or position.num_replicas == dist.get_world_size():
        return loader
    from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher, IterableDatasetShard
    if isinstance(loader, DataLoaderDispatcher):
        raise ValueError("seqpar: this loader dispatches batches (accelerate's dispatch_batches=True: rank 0 reads "
                         "and scatters): every rank of a sequence group needs the same batch. Turn dispatching off "
                         "(Accelerator(dataloader_config=DataLoaderConfiguration(dispatch_batches=False)), or "
                         "TrainingArguments(accelerator_config={'dispatch_batches': False}))")
    shards = [s for s in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None),
                          getattr(loader, "dataset", None)) if isinstance(s, (BatchSamplerShard, IterableDatasetShard))]
    if not shards:
        raise TypeError(f"seqpar: same_batch_per_group takes a loader prepared by accelerate (got "
                        f"{type(loader).__name__}); for a plain DataLoader use "
                        f"DistributedSampler(dataset, *seqpar_compiler.hf.group_data_parallel())")
    for shard in shards:
        shard.num_processes, shard.process_index = position
        if position.num_replicas == 1 and hasattr(shard, "even_batches"):
            # one group reads the data as one process does: accelerate does not shard a single
            # process's loader, so its last batch is not filled up with the first samples
            shard.even_batches = False
    return loader


def _pad_multiple(degree: int | None) -> int:
    """A length every schedule splits over the group: zigzag needs 2P, the others divide it."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return 2 * _degree(degree)


def _without_trivial_mask(inputs: dict, model) -> dict:
    """The batch without an ``attention_mask`` that masks nothing (all ones).

    Why: a mask that arrives with the batch cannot be proved causal (its values are data), so
    attention behind it runs replicated; without it the model builds its causal or packed-document
    mask from positions, which seqpar proves. A mask with padding in it is kept (exact, replicated,
    warned). Positions ``arange(S)`` are added when the model takes them and the batch has none,
    which is what the model computes itself, because TRL counts tokens from the mask or from them.
    """
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or not bool(mask.all()):
        return inputs
    out = {k: v for k, v in inputs.items() if k != "attention_mask"}       # a BatchEncoding becomes a dict
    ids = out.get("input_ids")
    if "position_ids" not in out and isinstance(ids, torch.Tensor) and _takes(model, "position_ids"):
        out["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    return out


def _takes(model, name: str) -> bool:
    while hasattr(model, "module"):          # DDP
        model = model.module
    model = getattr(model, "_orig_mod", model)
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _no_reduction(_state, bucket):
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def _reduce_once(model, degree: int | None = None) -> None:
    """Let DDP over the whole world reduce over the data-parallel ranks only.

    Under ``SEQPAR_GRAD_REDUCE=sum`` every rank of a group already holds its group's whole
    gradient; DDP's mean over the world would all-reduce it again over the sequence ranks. A comm
    hook (DDP's public extension point) averages each bucket over ``data_parallel_group()``
    instead, the same mean over groups, or, with one group, does nothing. Under ``none`` the
    gradients are partial and DDP's own reduction is the one that completes them: left alone.
    """
    from torch.nn.parallel import DistributedDataParallel
    from .options import get_option
    if not isinstance(model, DistributedDataParallel) or getattr(model, "_seqpar_reduce_once", False):
        return
    model._seqpar_reduce_once = True
    if get_option("grad_reduce") != "sum" or model.process_group is not None and \
            dist.get_world_size(model.process_group) != dist.get_world_size():
        return          # partial gradients, or DDP already spans fewer ranks than the world
    group = data_parallel_group(degree)
    if dist.get_world_size(group) == 1:
        model.register_comm_hook(None, _no_reduction)
    else:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        model.register_comm_hook(group, allreduce_hook)
    log.info("seqpar: DDP reduces gradients over the %d data-parallel rank(s) only (seqpar summed them "
             "over the sequence group)", dist.get_world_size(group))


def gather_for_metrics(accelerator, data, *, degree: int | None = None, use_gather_object: bool = False):
    """``accelerator.gather_for_metrics`` counting each sample once: one copy per sequence group.

    Every rank of a group evaluated the same batch, so a gather over the world holds P copies;
    this keeps the group leaders' (ranks 0, P, 2P, …) and drops the last batch's padding the way
    accelerate does (its remainder is over the data-parallel shards ``same_batch_per_group`` set).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return accelerator.gather_for_metrics(data, use_gather_object=use_gather_object)
    from accelerate.utils import recursively_apply
    P, world = _degree(degree), dist.get_world_size()
    try:
        recursively_apply(lambda x: x, data, error_on_other_type=True)
        tensors = not use_gather_object
    except TypeError:
        tensors = False
    if tensors:
        def leaders(t):
            return t.reshape(world, -1, *t.shape[1:])[::P].flatten(0, 1)
        out = recursively_apply(leaders, accelerator.gather(data))
    else:
        every = [None] * world
        dist.all_gather_object(every, data if isinstance(data, list) else [data])
        out = [x for chunk in every[::P] for x in chunk]
    state = accelerator.gradient_state
    if state.end_of_dataloader and state.remainder > 0:
        if tensors:
            return recursively_apply(lambda t: t[:state.remainder], out)
        return out[:state.remainder]
    return out


def prepare(accelerator, *objects, degree: int | None = None):
    """``accelerator.prepare(*objects)`` for sequence groups: loaders give each group its batches,
    DDP reduces over the data-parallel ranks only. Compile the model before (accelerate leaves a
    compiled model as it is)."""
    prepared = accelerator.prepare(*objects)
    items = prepared if isinstance(prepared, tuple) else (prepared,)
    for item in items:
        if isinstance(item, torch.utils.data.DataLoader):
            same_batch_per_group(item, degree=degree)
        _reduce_once(item, degree)
    return prepared


class SequenceParallelMixin:
    """Put first in a ``transformers.Trainer`` subclass's bases (or use ``sequence_parallel``).

    What it changes, all through ``Trainer``'s documented override points:
      * train/eval/test loaders: same batches within a sequence group (``same_batch_per_group``);
      * the collator (if it has ``pad_to_multiple_of``): pads to a multiple of 2P, so every batch
        splits over the group;
      * each step: an all-ones ``attention_mask`` is dropped (see ``_without_trivial_mask``), and
        on the first one DDP is set to reduce over the data-parallel ranks only;
      * evaluation gathers one copy per group (``gather_for_metrics``), so sample counts and
        metrics are the dataset's;
      * a warning when the first training step ran no sequence-parallel attention (the model was
        not compiled with seqpar, or its compiled call was bypassed);
      * while a loss is computed, TRL's fused LM head runs on each rank's own tokens
        (``trl_fused_head.py``).
    ``seqpar_degree`` (class attribute or keyword): ranks per group, default ``SEQPAR_DEGREE``.
    """

    seqpar_degree: int | None = None

    def __init__(self, *args, seqpar_degree: int | None = None, **kwargs):
        if seqpar_degree is not None:
            self.seqpar_degree = seqpar_degree
        super().__init__(*args, **kwargs)
        self._seqpar_checked = False
        multiple = _pad_multiple(self.seqpar_degree)
        collator = getattr(self, "data_collator", None)
        if multiple > 1 and hasattr(collator, "pad_to_multiple_of"):
            collator.pad_to_multiple_of = math.lcm(collator.pad_to_multiple_of or 1, multiple)

    def get_train_dataloader(self):
        return same_batch_per_group(super().get_train_dataloader(), degree=self.seqpar_degree)

    def get_eval_dataloader(self, eval_dataset=None):
        return same_batch_per_group(super().get_eval_dataloader(eval_dataset), degree=self.seqpar_degree)

    def get_test_dataloader(self, test_dataset):
        return same_batch_per_group(super().get_test_dataloader(test_dataset), degree=self.seqpar_degree)

    def training_step(self, model, inputs, *args, **kwargs):
        _reduce_once(model, self.seqpar_degree)
        inputs = _without_trivial_mask(inputs, model)
        if self._seqpar_checked:
            return super().training_step(model, inputs, *args, **kwargs)
        self._seqpar_checked = True
        from .runtime.stats import stats
        with stats() as st:
            loss = super().training_step(model, inputs, *args, **kwargs)
        if group_data_parallel(self.seqpar_degree).num_replicas < _world() and st.attention_forward_calls == 0:
            warnings.warn("seqpar: the first training step ran no sequence-parallel attention: every rank computed "
                          "the whole sequence. Compile the model with model.compile(backend='seqpar') before "
                          "building the trainer (TRL replaces the forward of the wrapper torch.compile(model) "
                          "returns, so that wrapper's compiled code never runs)", stacklevel=2)
        return loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        # TRL's fused LM head scores each rank's own tokens (trl_fused_head.py)
        from .trl_fused_head import fused_head_on_shards
        with fused_head_on_shards():
            return super().compute_loss(model, inputs, *args, **kwargs)

    def prediction_step(self, model, inputs, *args, **kwargs):
        return super().prediction_step(model, _without_trivial_mask(inputs, model), *args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        # Trainer gathers predictions, labels and losses through ``self.gather_function`` and
        # resets it to accelerate's at the end of each loop: set it for this loop
        self.gather_function = functools.partial(gather_for_metrics, self.accelerator, degree=self.seqpar_degree)
        return super().evaluation_loop(*args, **kwargs)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_made: dict[type, type] = {}


def sequence_parallel(trainer_cls: type) -> type:
    """``trainer_cls`` (``transformers.Trainer``, TRL's ``SFTTrainer``, …) with
    ``SequenceParallelMixin`` first in its bases; the same class on every call."""
    if issubclass(trainer_cls, SequenceParallelMixin):
        return trainer_cls
    if trainer_cls not in _made:
        _made[trainer_cls] = type(f"SequenceParallel{trainer_cls.__name__}", (SequenceParallelMixin, trainer_cls),
                                  {"__module__": __name__, "__doc__": trainer_cls.__doc__})
    return _made[trainer_cls]
