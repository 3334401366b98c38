"""Eager ops on ``SequenceShard``s: what ``__torch_dispatch__`` does with each ATen op.

The code between compiled frames (FSDP2's eager root, an embedding or loss outside the compiled
region, the backward of those ops) runs here. Every op takes its plan from the sharding core
(``runtime/sharding/ops.py``), the same one the compiled rewrite uses, and runs it on local
tensors: shards as they are, a plain full-length operand sliced in the layout, a partial result
summed over the group (``grad_sum``: left partial in the backward under
``SEQPAR_GRAD_REDUCE=none``). A few eager-only rules stay here: the losses (``nll_loss``, whose
mean counts the targets that are not ignored) and the 2-norm a user reads. Anything the core
refuses gathers the sequence and runs replicated, with a warning naming the op; a write lands
in the shard it writes, a view that cannot stay a view of the shard is marked detached.

Shape legend: S global sequence length, P group size, S_local = S/P; a shard's ``spec.dim`` has
global size pre·S·post and local size pre·S_local·post.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.distributed import _functional_collectives as _c10d
from torch.utils._pytree import tree_flatten, tree_map

from .gathered_view import GatheredView, check_detached, detach_from, is_view_op, written_arguments
from .sharding.dtensor_bridge import TENSOR
from .sharding.ops import Refusal, TensorArg, op_registrar, plan_op
from .sharding.placements import Partial, Replicate, Shard
from .sequence_shard import (SequenceShard, ShardSpec, _is_fake, all_reduce_sum, gather_local, grad_sum, slice_local,
                             warn_gather)

__all__ = ["dispatch", "group_loss"]

aten = torch.ops.aten
_RULES: dict[Any, Callable] = {}
# reading the data is the user asking for the full value: gathered without a warning
_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}


_rule = op_registrar(_RULES)


def dispatch(func, args, kwargs):
    """The rule of ``func``, else the gather fallback. Aliases stay aliases or say they are not:
    a view op whose shard result could not view the input's local tensor, or that the fallback
    computed from the gathered sequence (a ``GatheredView``), is marked detached: a write into
    it, or a read after its base was written, raises instead of silently diverging. While
    Dynamo traces (fake locals) the values are only examples and nothing is marked."""
    flat, _ = tree_flatten((args, kwargs))
    shards = [a for a in flat if isinstance(a, SequenceShard)]
    spec = shards[0].spec
    tracing = any(_is_fake(a._local) for a in shards)
    if not tracing:
        check_detached(func, args, kwargs)
    rule = _RULES.get(func)
    view = is_view_op(func) and isinstance(args[0], SequenceShard) and not tracing
    result = rule(func, spec, *args, **kwargs) if rule is not None else _planned(func, shards, args, kwargs)
    if view and result is not NotImplemented and not _views_local(result, args[0]):
        tree_map(lambda o: detach_from(o, args[0]) if isinstance(o, SequenceShard) else o, result)
    if result is NotImplemented:
        result = _fallback(func, args, kwargs)
    if view:       # a plain result of a view op (the fallback's, or one row read: select) views no shard
        result = tree_map(lambda o: GatheredView(o, args[0]) if isinstance(o, Tensor)
                          and not isinstance(o, SequenceShard) else o, result)
    return result


def _views_local(result, source) -> bool:
    """Every shard in ``result`` views ``source``'s local tensor (a reshape may have copied)."""
    if not isinstance(source, SequenceShard):
        return True
    home = StorageWeakRef(source._local.untyped_storage())
    outs = result if isinstance(result, (list, tuple)) else [result]
    return all(StorageWeakRef(o._local.untyped_storage()) == home for o in outs if isinstance(o, SequenceShard))


# -- the gather fallback ---------------------------------------------------------------------------
def _fallback(func, args, kwargs):
    flat, _ = tree_flatten((args, kwargs))
    if func not in _READS and any(a.spec.grad_reduce == "none" and not _is_fake(a._local)
                                  for a in flat if isinstance(a, SequenceShard)) and _in_backward():
        # a gathered gradient is whole on every rank, where GRAD_REDUCE=none promises a partial
        # one: the data-parallel sum over dp x sp would count it P times (never wrong: refuse)
        raise RuntimeError(f"seqpar: eager op {func} has no sequence-parallel rule for a sequence-sharded gradient "
                           f"under SEQPAR_GRAD_REDUCE=none; gathering would leave a whole gradient where a partial one "
                           f"is expected. Use SEQPAR_GRAD_REDUCE=sum, or compute this op inside a compiled frame")
    if func not in _READS and not any(_is_fake(a._local) for a in flat if isinstance(a, SequenceShard)):
        warn_gather(str(func), "has no eager sequence-parallel rule",
                    next((a.spec for a in flat if isinstance(a, SequenceShard)), None))
    full = {}                                   # one gathered copy per shard, so a write lands in the one read back

    def gathered(a):
        if isinstance(a, SequenceShard):
            if id(a) not in full:
                full[id(a)] = gather_local(a._local, a.spec)
            return full[id(a)]
        return a
    full_args, full_kwargs = tree_map(gathered, (args, kwargs))
    out = func(*full_args, **full_kwargs)
    written = [a for a in written_arguments(func, args, kwargs) if isinstance(a, SequenceShard)]
    for target in written:                      # a write into a shard: its part of the written copy goes home
        target._local.copy_(slice_local(full[id(target)], target.spec))
    home = {id(full[id(t)]): t for t in written}     # an in-place or out= op returns the shard it wrote
    return tree_map(lambda o: home.get(id(o), o) if isinstance(o, Tensor) else o, out)


def _in_backward() -> bool:
    """Inside autograd's backward (a checkpoint's forward recompute runs with grad mode on)."""
    return torch._C._current_autograd_node() is not None and not torch.is_grad_enabled()


# -- the core's plan, run on local tensors ---------------------------------------------------------
def _planned(func, shards, args, kwargs):
    """Run ``func`` as the sharding core plans it; NotImplemented where it refuses."""
    first = shards[0].spec
    if any((s.spec.S, s.spec.schedule, s.spec.group_name, s.spec.part) !=
           (first.S, first.schedule, first.group_name, first.part)
           and not _same_rows(s.spec.moved(first.dim), first) for s in shards):
        return NotImplemented                    # shards of different layouts or parts: gathered
    try:
        out_shapes = _global_out_shapes(func, args, kwargs)
    except Exception:  # noqa: BLE001 - no meta kernel (a data-dependent op): the fallback runs it
        return NotImplemented
    targs, tkwargs = tree_map(_as_arg, (args, kwargs))
    try:
        plan = plan_op(func, targs, tkwargs, S=first.length, P=first.P, group_name=first.group_name,
                       out_shapes=out_shapes, schedule=first.schedule,
                       local_len=None if first.part is None else first.local_length)
    except Refusal:
        return NotImplemented
    pre, post = plan.merged
    tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
    locals_ = []
    for t, how in zip(tensors, plan.operands):
        if how == "local":
            locals_.append(t._local)
        elif how == "whole":
            locals_.append(t)
        else:
            locals_.append(slice_local(t, first.moved(how[1], pre, post)))
    it = iter(locals_)

    def fill(v):
        if v is TENSOR:
            return next(it)
        if isinstance(v, (list, tuple)):
            return type(v)(fill(x) for x in v)
        return v
    out = (plan.call or _viewable(func))(*fill(plan.args), **{k: fill(v) for k, v in plan.kwargs.items()})
    written = [a for a in written_arguments(func, args, kwargs) if isinstance(a, SequenceShard)]
    if written and func._schema.returns and written[0] is args[0]:
        return args[0]                           # in place: the shard whose local was written
    outs = out if isinstance(out, (list, tuple)) else (out,)
    wrapped = [_placed(o, pl, first) for o, pl in zip(outs, plan.outputs)]
    return type(out)(wrapped) if isinstance(out, (list, tuple)) else wrapped[0]


def _viewable(func):
    """``aten.view`` that copies where the local tensor cannot be viewed as asked. The wrapper's
    own strides are contiguous, so ``reshape`` of an expanded or transposed shard decomposes to
    ``view`` above this dispatch (HF's ``repeat_kv``: ``k[:, :, None].expand(...).reshape(...)``)
    while its local tensor needs a copy; ``dispatch`` marks such a result as no view of its input."""
    if func is not aten.view.default:
        return func

    def view_or_copy(local, shape):
        try:
            return local.view(shape)
        except (RuntimeError, ValueError):
            return local.reshape(shape)
    return view_or_copy


def _placed(value, placement, spec: ShardSpec):
    """A local result as the plan places it: a shard, a partial sum made whole, or as it is."""
    if not isinstance(value, Tensor):
        return value
    if isinstance(placement, Shard):
        return SequenceShard(value, spec.moved(placement.dim, placement.pre, placement.post))
    if isinstance(placement, Partial):
        total = grad_sum(value, spec)
        return total / spec.P if placement.reduce == "avg" else total
    return value


def _as_arg(v):
    if isinstance(v, SequenceShard):
        return TensorArg(tuple(v.shape), v.dtype, Shard(v.spec.dim, v.spec.pre, v.spec.post))
    if isinstance(v, Tensor):
        return TensorArg(tuple(v.shape), v.dtype, Replicate())
    return v


def _global_out_shapes(func, args, kwargs) -> tuple:
    """The shapes of ``func``'s outputs on the full values, from meta tensors."""
    def meta(v):
        if isinstance(v, Tensor):
            return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
        return v
    # a device argument (``x.float()`` is ``_to_copy(dtype=..., device=cpu)`` here) would copy
    # the meta tensor out to it: the shapes are the same on meta
    kwargs = {k: ("meta" if k == "device" and v is not None else v) for k, v in kwargs.items()}
    out = func(*tree_map(meta, args), **tree_map(meta, kwargs))
    outs = out if isinstance(out, (list, tuple)) else (out,)
    return tuple(tuple(o.shape) if isinstance(o, Tensor) else None for o in outs)


def _localize(value, spec: ShardSpec, dim: int | None):
    """An operand as this rank's part along ``dim`` of ``spec``: a shard as its local tensor
    (NotImplemented when it lies elsewhere), a plain tensor of full size there sliced, anything
    else as it is."""
    if isinstance(value, SequenceShard):
        if dim is None or not _same_rows(value.spec, spec.moved(dim)):
            return NotImplemented
        return value._local
    if isinstance(value, Tensor) and dim is not None and 0 <= dim < value.dim() and value.shape[dim] != 1:
        if value.shape[dim] != spec.global_size:
            return NotImplemented
        return slice_local(value, spec.moved(dim))
    return value


# -- losses and reads ---------------------------------------------------------------------------------
# the target's and a per-row result's sequence dim, from the scores' (nll_loss: [N, C] over N, the
# merged batch × sequence; nll_loss2d: [N, C, 1, S] over S, what cross_entropy makes of [N, C, S]
# scores, the class-second form einops-style code writes)
_LOSS_TARGET_DIM = {aten.nll_loss_forward.default: {0: 0}, aten.nll_loss2d_forward.default: {2: 1, 3: 2},
                    aten.nll_loss_backward.default: {0: 0}, aten.nll_loss2d_backward.default: {2: 1, 3: 2}}
_LOSS_SCORES_DIMS = {aten.nll_loss_forward.default: 2, aten.nll_loss2d_forward.default: 4,
                     aten.nll_loss_backward.default: 2, aten.nll_loss2d_backward.default: 4}


@_rule(aten.nll_loss_forward.default, aten.nll_loss2d_forward.default)
def _nll_forward(func, spec, x, target, weight, reduction, ignore_index):
    """Scores sharded over their rows: local sums and counts, summed over the group; ``mean``
    divides by the global count of targets that are not ignored (with class weights, the sum of
    their weights)."""
    if not isinstance(x, SequenceShard) or isinstance(weight, SequenceShard):
        return NotImplemented
    spec = x.spec
    d = _LOSS_TARGET_DIM[func].get(spec.dim)
    if d is None or x.dim() != _LOSS_SCORES_DIMS[func]:
        return NotImplemented
    t = _localize(target, spec, d)
    if t is NotImplemented:
        return NotImplemented
    if reduction == 0:
        out, tw = func(x._local, t, weight, 0, ignore_index)
        return SequenceShard(out, spec.moved(d)), tw
    return group_loss(func, x._local, t, weight, reduction, ignore_index, spec)


def group_loss(func, scores: Tensor, target: Tensor, weight, reduction: int, ignore_index: int, spec: ShardSpec):
    """An NLL loss (``func``) whose rows are split over the group, reduced as over all of them:
    each rank's sum and count of kept targets (their class weights' sum, with ``weight``), both
    summed over the group; ``mean`` divides. Returns the loss and the count (aten's
    ``total_weight``, which its backward divides by)."""
    total, _ = func(scores, target, weight, 2, ignore_index)     # aten's total_weight under "sum" is 0
    kept = target != ignore_index
    count = kept.sum() if weight is None else (weight[target.masked_fill(~kept, 0)] * kept).sum()
    total, count = all_reduce_sum(torch.stack([total, count.to(total.dtype)]), spec).unbind(0)
    return (total / count if reduction == 1 else total), count


@_rule(aten.nll_loss_backward.default, aten.nll_loss2d_backward.default)
def _nll_backward(func, spec, grad, x, target, weight, reduction, ignore_index, total_weight):
    """A mean or sum's gradient is a replicated scalar; ``reduction="none"``'s is one value per
    row, this rank's rows of it (a shard as it is, a plain full one cut in the layout)."""
    if not isinstance(x, SequenceShard):
        return NotImplemented
    spec = x.spec
    d = _LOSS_TARGET_DIM[func].get(spec.dim)
    if d is None or x.dim() != _LOSS_SCORES_DIMS[func]:
        return NotImplemented
    t = _localize(target, spec, d)
    g = _localize(grad, spec, d) if reduction == 0 else grad
    if t is NotImplemented or g is NotImplemented or isinstance(g, SequenceShard):
        return NotImplemented
    return SequenceShard(func(g, x._local, t, weight, reduction, ignore_index, total_weight), spec)


@_rule(aten.amax.default, aten.amin.default)
def _extreme(func, spec, x, dim=(), keepdim=False):
    """The largest (smallest) value along dims that include the sequence: each rank's, then the
    group's (an all-reduce of the reduced tensor). Its backward (the positions equal to it, the
    count of ties summed over the group) runs through the core as elementwise ops and a sum."""
    spec = x.spec
    dims = {d % x.dim() for d in (dim if isinstance(dim, (list, tuple)) else [dim])} or set(range(x.dim()))
    if spec.dim not in dims or spec.part is not None or x._local.shape[spec.dim] == 0 or _is_fake(x._local):
        return _planned(func, [x], (x, dim, keepdim), {})
    local = func(x._local, list(dims), keepdim)
    how = "max" if func is aten.amax.default else "min"
    return _c10d.wait_tensor(_c10d.all_reduce(local.contiguous(), how, spec.group_name)) if spec.P > 1 else local


def _same_rows(a: ShardSpec, b: ShardSpec) -> bool:
    from .sequence_shard_parts import same_rows      # parts registers into this module: imported late
    return same_rows(a, b)


@_rule(aten.index.Tensor)
def _index(func, spec, x, indices):
    """``x[mask]`` with a boolean mask through the sequence dim (``logits[labels != -100]``):
    each rank's own selected rows (``token_rows.masked_rows``); any other indexing as the core
    plans it."""
    if (isinstance(x, SequenceShard) and len(indices) == 1 and isinstance(indices[0], Tensor)
            and not _is_fake(x._local)):
        from .token_rows import masked_rows
        rows = masked_rows(x, indices[0])
        if rows is not None:
            return rows
    return _planned(func, [a for a in [x, *indices] if isinstance(a, SequenceShard)], (x, indices), {})


@_rule(aten.nonzero.default)
def _nonzero(func, spec, x):
    """Each rank's own nonzero entries (eager MoE token lists): ``token_rows.py``. While Dynamo
    traces (``capture_dynamic_output_shape_ops``) the count is unbacked: the gather as before."""
    if _is_fake(x._local):
        return NotImplemented
    from .token_rows import nonzero_rows
    return nonzero_rows(x)


@_rule(aten.linalg_vector_norm.default)
def _vector_norm(func, spec, x, ord=2, dim=None, keepdim=False, *, dtype=None):
    """The 2-norm of the whole value (what a user comparing outputs reads): the local sum of
    squares, summed over the group."""
    if ord != 2 or dim not in (None, [], ()) or keepdim:
        return NotImplemented
    local = x._local if dtype is None else x._local.to(dtype)
    return all_reduce_sum(local.pow(2).sum(), spec).sqrt()


# split / slice / cat along the sequence dim: parts of the sequence (a chunked loss between frames)
from . import sequence_shard_parts  # noqa: E402,F401  (registers into _RULES)
