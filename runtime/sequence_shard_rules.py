"""Eager rules of ``SequenceShard`` ops: what ``__torch_dispatch__`` does with each ATen op.

The compiler's rules in small (DESIGN §2 "Placements"), for the code between compiled frames
(FSDP2's eager root, an embedding or loss outside the compiled region) and for the backward of
those ops. Every rule either keeps the sequence sharded (computing on local shards, slicing a
plain full-length operand in the layout) or reduces over it (local op + all-reduce, result plain
and whole); anything it cannot do falls back to gathering the sequence, with a warning naming
the op. A rule returns ``NotImplemented`` to take the fallback.

Shape legend: S global sequence length, P group size, S_local = S/P; a shard's ``spec.dim`` has
global size pre·S·post and local size pre·S_local·post.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from torch.multiprocessing.reductions import StorageWeakRef

from .gathered_view import GatheredView, check_detached, detach_from, is_view_op, written_arguments
from .sequence_shard import (SequenceShard, ShardSpec, _is_fake, all_reduce_sum, gather_local, grad_sum, slice_local,
                             warn_gather)

__all__ = ["dispatch"]

aten = torch.ops.aten
_RULES: dict[Any, Callable] = {}
# reading the data is the user asking for the full value: gathered without a warning
_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}


def _rule(*ops):
    def register(fn):
        for op in ops:
            _RULES[op] = fn
        return fn
    return register


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
    result = NotImplemented
    view = is_view_op(func) and isinstance(args[0], SequenceShard) and not tracing
    if rule is not None:
        result = rule(func, spec, *args, **kwargs)
    elif torch.Tag.pointwise in func.tags or func in _LIKE:
        result = _pointwise(func, spec, args, kwargs)
    if view and result is not NotImplemented and not _views_local(result, args[0]):
        tree_map(lambda o: detach_from(o, args[0]) if isinstance(o, SequenceShard) else o, result)
    if result is NotImplemented:
        result = _fallback(func, args, kwargs)
        if view:
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


# -- helpers ------------------------------------------------------------------------------------
def _local_size(spec: ShardSpec) -> int:
    return spec.global_size // spec.P


def _wrap(local, spec: ShardSpec):
    return SequenceShard(local, spec)


def _localize(value, spec: ShardSpec, dim: int | None):
    """An operand as this rank's part along ``dim`` of ``spec``: a shard as its local tensor
    (NotImplemented when it lies elsewhere), a plain tensor of full size there sliced, anything
    else as it is."""
    if isinstance(value, SequenceShard):
        if dim is None or value.spec != spec.moved(dim):
            return NotImplemented
        return value._local
    if isinstance(value, Tensor) and dim is not None and 0 <= dim < value.dim() and value.shape[dim] != 1:
        if value.shape[dim] != spec.global_size:
            return NotImplemented
        return slice_local(value, spec.moved(dim))
    return value


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


# -- pointwise and *_like -------------------------------------------------------------------------
_LIKE = {aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
         aten.rand_like.default, aten.randn_like.default, aten.clone.default, aten._to_copy.default,
         aten.detach.default, aten.alias.default, aten.fill_.Scalar, aten.zero_.default}


def _pointwise(func, spec: ShardSpec, args, kwargs):
    """Broadcasting aligns dims from the right: the sequence dim is the same right-offset ``k``
    in every operand; an operand with size 1 (or no dim) there broadcasts as it is."""
    shards = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, SequenceShard)]
    k = shards[0].dim() - spec.dim
    if any(s.dim() - s.spec.dim != k or s.spec != spec.moved(s.spec.dim) for s in shards):
        return NotImplemented
    bad = []

    def local(a):
        if not isinstance(a, Tensor):
            return a
        out = _localize(a, spec, a.dim() - k if a.dim() - k >= 0 else None)
        if out is NotImplemented:
            bad.append(a)
        return out
    if func._schema.is_mutable and not isinstance(args[0], SequenceShard):
        return NotImplemented          # a write into a plain tensor: the fallback writes the full values into it
    l_args, l_kwargs = tree_map(local, (args, kwargs))
    if bad:
        return NotImplemented
    out = func(*l_args, **l_kwargs)
    if func._schema.is_mutable:
        return args[0]

    def wrap(o):
        if isinstance(o, Tensor) and o.dim() >= k and o.shape[o.dim() - k] == _local_size(spec):
            return _wrap(o, spec.moved(o.dim() - k))
        return o
    return tree_map(wrap, out)


# -- views --------------------------------------------------------------------------------------
def _view_spec(src, dst, spec: ShardSpec) -> ShardSpec | None:
    """Where the sequence lies after viewing global shape ``src`` as ``dst`` (None: split across dims)."""
    pre_total = math.prod(src[:spec.dim]) * spec.pre
    post_total = spec.post * math.prod(src[spec.dim + 1:])
    for o in range(len(dst)):
        before, after = math.prod(dst[:o]), math.prod(dst[o + 1:])
        if pre_total % before or post_total % after:
            continue
        pre_o, post_o = pre_total // before, post_total // after
        if dst[o] == pre_o * spec.S * post_o:
            return spec.moved(o, pre_o, post_o)
    return None


@_rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(func, spec, x, size):
    if not isinstance(x, SequenceShard):
        return NotImplemented
    src = list(x.shape)
    dst = list(size)
    if -1 in dst:
        i = dst.index(-1)
        dst[i] = math.prod(src) // math.prod(d for j, d in enumerate(dst) if j != i)
    new = _view_spec(src, dst, spec)
    if new is None:
        return NotImplemented
    dst[new.dim] = _local_size(new)
    return _wrap(x._local.reshape(dst), new)


@_rule(aten.transpose.int)
def _transpose(func, spec, x, d0, d1):
    d0, d1 = d0 % x.dim(), d1 % x.dim()
    new = d1 if spec.dim == d0 else d0 if spec.dim == d1 else spec.dim
    return _wrap(x._local.transpose(d0, d1), spec.moved(new))


@_rule(aten.t.default)
def _t(func, spec, x):
    return _transpose(func, spec, x, 0, x.dim() - 1)


@_rule(aten.permute.default)
def _permute(func, spec, x, dims):
    dims = [d % x.dim() for d in dims]
    return _wrap(x._local.permute(dims), spec.moved(dims.index(spec.dim)))


@_rule(aten.unsqueeze.default)
def _unsqueeze(func, spec, x, d):
    d = d % (x.dim() + 1)
    return _wrap(x._local.unsqueeze(d), spec.moved(spec.dim + (d <= spec.dim)))


@_rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(func, spec, x, dims=None):
    dims = range(x.dim()) if dims is None else [dims] if isinstance(dims, int) else dims
    gone = [d % x.dim() for d in dims if x.shape[d] == 1 and d % x.dim() != spec.dim]
    local = x._local
    for d in sorted(gone, reverse=True):
        local = local.squeeze(d)
    return _wrap(local, spec.moved(spec.dim - sum(d < spec.dim for d in gone)))


@_rule(aten.expand.default)
def _expand(func, spec, x, size, implicit=False):
    if not isinstance(x, SequenceShard):
        return NotImplemented
    new_dim = len(size) - (x.dim() - spec.dim)
    size = list(size)
    size[new_dim] = _local_size(spec)
    return _wrap(x._local.expand(size), spec.moved(new_dim))


@_rule(aten.slice.Tensor)
def _slice(func, spec, x, dim=0, start=None, end=None, step=1):
    if dim % x.dim() == spec.dim:
        return NotImplemented
    return _wrap(func(x._local, dim, start, end, step), spec)


@_rule(aten.select.int)
def _select(func, spec, x, dim, index):
    dim = dim % x.dim()
    if dim == spec.dim:
        return NotImplemented
    return _wrap(x._local.select(dim, index), spec.moved(spec.dim - (dim < spec.dim)))


@_rule(aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int)
def _split(func, spec, x, *rest, **kw):
    dim = (rest[1] if len(rest) > 1 else kw.get("dim", 0)) if func != aten.unbind.int else (rest[0] if rest else 0)
    dim = dim % x.dim()
    if dim == spec.dim:
        return NotImplemented
    new = spec.moved(spec.dim - (dim < spec.dim)) if func == aten.unbind.int else spec
    return [_wrap(p, new) for p in func(x._local, *rest, **kw)]


# -- reductions ---------------------------------------------------------------------------------
@_rule(aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default)
def _reduce(func, spec, x, dims=None, keepdim=False, *, dtype=None):
    all_dims = dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0)
    dims = list(range(x.dim())) if all_dims else [d % x.dim() for d in dims]
    mean = func in (aten.mean.dim, aten.mean.default)
    local = x._local.sum(dims, keepdim=keepdim, dtype=dtype)
    if spec.dim not in dims:
        if mean:
            local = local / math.prod(x.shape[d] for d in dims)
        return _wrap(local, spec.moved(spec.dim - (0 if keepdim else sum(d < spec.dim for d in dims))))
    total = grad_sum(local, spec)
    return total / math.prod(x.shape[d] for d in dims) if mean else total


# -- matmuls ------------------------------------------------------------------------------------
_LABELS = {aten.mm.default: ("mk", "kn", "mn"), aten.bmm.default: ("bmk", "bkn", "bmn")}


@_rule(aten.mm.default, aten.bmm.default)
def _matmul(func, spec, a, b):
    """Einsum-style: the sequence label either survives into the output (shard there) or is
    contracted (local product, then an all-reduce: every rank summed only its tokens)."""
    la, lb, lo = _LABELS[func]
    labels = {la[a.spec.dim] if isinstance(a, SequenceShard) else None,
              lb[b.spec.dim] if isinstance(b, SequenceShard) else None} - {None}
    if len(labels) != 1:
        return NotImplemented
    (lab,) = labels
    a_l = _localize(a, spec, la.index(lab) if lab in la else None)
    b_l = _localize(b, spec, lb.index(lab) if lab in lb else None)
    if a_l is NotImplemented or b_l is NotImplemented:
        return NotImplemented
    out = func(a_l, b_l)
    return _wrap(out, spec.moved(lo.index(lab))) if lab in lo else grad_sum(out, spec)


@_rule(aten.addmm.default)
def _addmm(func, spec, bias, a, b, *, beta=1, alpha=1):
    if beta != 1 or alpha != 1 or isinstance(bias, SequenceShard):
        return NotImplemented
    out = _matmul(aten.mm.default, spec, a, b)
    if out is NotImplemented or not isinstance(out, SequenceShard):
        return NotImplemented
    return _pointwise(aten.add.Tensor, out.spec, (out, bias), {})


# -- softmax, norms, embedding, loss ----------------------------------------------------------------
@_rule(aten._log_softmax.default, aten._softmax.default, aten._log_softmax_backward_data.default,
       aten._softmax_backward_data.default)
def _softmax(func, spec, *args):
    x = next(a for a in args if isinstance(a, SequenceShard))
    dim = args[1] if func in (aten._log_softmax.default, aten._softmax.default) else args[2]
    if dim % x.dim() == spec.dim:
        return NotImplemented
    return _pointwise(func, spec, args, {})


@_rule(aten.native_layer_norm.default)
def _layer_norm(func, spec, x, normalized_shape, weight, bias, eps):
    if not isinstance(x, SequenceShard) or spec.dim >= x.dim() - len(normalized_shape):
        return NotImplemented
    out, mean, rstd = func(x._local, normalized_shape, weight, bias, eps)
    return _wrap(out, spec), _wrap(mean, spec), _wrap(rstd, spec)


@_rule(aten.native_layer_norm_backward.default)
def _layer_norm_backward(func, spec, grad, x, normalized_shape, mean, rstd, weight, bias, mask):
    locs = [_localize(t, spec, spec.dim) for t in (grad, x, mean, rstd)]
    if any(v is NotImplemented for v in locs):
        return NotImplemented
    gi, gw, gb = func(*locs[:2], normalized_shape, *locs[2:], weight, bias, mask)
    return (_wrap(gi, spec) if gi is not None else None,
            grad_sum(gw, spec) if gw is not None else None,
            grad_sum(gb, spec) if gb is not None else None)


@_rule(aten.embedding.default)
def _embedding(func, spec, weight, indices, *rest):
    if isinstance(weight, SequenceShard):
        return NotImplemented
    return _wrap(func(weight, indices._local, *rest), spec)


@_rule(aten.embedding_dense_backward.default)
def _embedding_backward(func, spec, grad, indices, num_weights, padding_idx, scale_grad_by_freq):
    if scale_grad_by_freq or not isinstance(grad, SequenceShard):
        return NotImplemented
    idx = _localize(indices, spec, spec.dim)
    if idx is NotImplemented:
        return NotImplemented
    return grad_sum(func(grad._local, idx, num_weights, padding_idx, False), spec)


@_rule(aten.nll_loss_forward.default)
def _nll_forward(func, spec, x, target, weight, reduction, ignore_index):
    """[N, C] scores sharded over N (the merged batch × sequence): local sums and counts, summed
    over the group; ``mean`` divides by the global count."""
    if not isinstance(x, SequenceShard) or spec.dim != 0 or x.dim() != 2 or weight is not None:
        return NotImplemented
    t = _localize(target, spec, 0)
    if t is NotImplemented:
        return NotImplemented
    if reduction == 0:
        out, tw = func(x._local, t, weight, 0, ignore_index)
        return _wrap(out, spec), tw
    total, count = func(x._local, t, weight, 2, ignore_index)
    count = (t != ignore_index).sum().to(total.dtype)      # aten's total_weight under "sum" is 0
    total, count = all_reduce_sum(torch.stack([total, count]), spec).unbind(0)
    return (total / count if reduction == 1 else total), count


@_rule(aten.nll_loss_backward.default)
def _nll_backward(func, spec, grad, x, target, weight, reduction, ignore_index, total_weight):
    if not isinstance(x, SequenceShard) or spec.dim != 0 or isinstance(grad, SequenceShard):
        return NotImplemented
    t = _localize(target, spec, 0)
    if t is NotImplemented:
        return NotImplemented
    return _wrap(func(grad, x._local, t, weight, reduction, ignore_index, total_weight), spec)


@_rule(aten.copy_.default)
def _copy(func, spec, dst, src, non_blocking=False):
    if not isinstance(dst, SequenceShard):
        return NotImplemented
    s = _localize(src, spec.moved(dst.spec.dim), dst.spec.dim)
    if s is NotImplemented:
        return NotImplemented
    dst._local.copy_(s, non_blocking)
    return dst


@_rule(aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
       aten.new_empty_strided.default)
def _new(func, spec, x, *rest, **kw):
    return func(x._local, *rest, **kw)        # a fresh plain tensor of the given size


@_rule(aten.linalg_vector_norm.default)
def _vector_norm(func, spec, x, ord=2, dim=None, keepdim=False, *, dtype=None):
    """The 2-norm of the whole value (what a user comparing outputs reads): the local sum of
    squares, summed over the group."""
    if ord != 2 or dim not in (None, [], ()) or keepdim:
        return NotImplemented
    local = x._local if dtype is None else x._local.to(dtype)
    return all_reduce_sum(local.pow(2).sum(), spec).sqrt()
