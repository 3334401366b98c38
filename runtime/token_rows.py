"""``TokenRows``: eager token-local values, each rank's own rows of a data-dependent selection.

Eager MoE code (transformers' ``experts_implementation="eager"``) loops over experts and asks,
for each, which tokens chose it: ``top_k_pos, token_idx = torch.where(mask[e])``. The answer
depends on the data, so Dynamo breaks the graph and the loop runs eagerly on ``SequenceShard``s.
Routing is per token, so each rank can answer for its own tokens: ``nonzero`` of a shard taken
locally gives this rank's entries, ``x[token_idx]`` picks its own rows, ``index_add_`` writes
them back into its own rows. That is the compiled token-local pass (``passes/token_local.py``)
in eager form, with the sharding core's placements. A loss that picks rows by a boolean mask
(``logits[labels != -100]``) is the same kind of selection (``masked_rows``): its softmax,
``gather``, cross entropy and their gradients run on this rank's rows, and a plain value with
one entry per selected row (the targets, a mean's gradient) is cut at this rank's places in the
one-process result.

The placements:

  * ``Rows(dim, 1, 1, order)``: this rank's rows of a selection (one ``nonzero`` call is one
    ``order``), in local order; row i of every value of one order belongs to the same entry;
  * ``RowIndex(at, pre, post, "")``: values that are local row numbers of the token dim with
    merged factors (pre, post) in the layout's order — the token column of a ``nonzero``.

A rank's row count is its own; the global shape (which the wrapper must state) sums the counts
over the group (one all-gather of a count per ``nonzero``). Every op a token list meets in that
loop and in its backward runs locally: elementwise ops on rows of one order, matmuls that keep
the rows (or contract them: a weight's gradient, summed over the group), views, splits and
sums that keep the row dim whole, ``x[idx]`` / ``index_select`` / ``index_add`` /
``index_put`` between a shard and its own rows.

Anything else is never guessed: each selection keeps the global sort key of its rows (where
the entry sits in the one-process ``nonzero``), so an op without a rule all-gathers the rows,
puts them in the one-process order and computes it replicated, warned (exact, slower).

``TokenRows`` has no ``__tensor_flatten__`` on purpose: Dynamo cannot trace it, so a compiled
function called with one (an activation module inside the loop) runs eagerly through these
rules instead of being compiled as if its input were a sequence shard of known size.

Shape legend: n the global number of selected entries (sum over ranks), n_r this rank's; a
token dim has global size pre·S·post and local size pre·(S/P)·post.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from .layout import local_positions
from .sharding.ops import op_registrar
from .sharding.placements import RowIndex, Rows
from .sequence_shard import SequenceShard, ShardSpec, gather_local, grad_sum, slice_local, warn_gather
from .sequence_shard_rules import group_loss

__all__ = ["RowOrder", "TokenRows", "nonzero_rows", "masked_rows", "full_rows"]

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional
_names = itertools.count()


@dataclass(eq=False)
class RowOrder:
    """One selection's rows: ``counts`` per rank, the token dim they come from (``token``: the
    shard's spec) and ``keys``, this rank's rows' places in the one-process result."""

    name: str
    token: ShardSpec
    counts: tuple
    keys: Tensor
    _order: Tensor | None = field(default=None, repr=False)
    # a selection by a boolean mask (``masked_rows``): this rank's part of the mask, which picks
    # the same rows again for the gradient (``index_put``)
    local_mask: Tensor | None = field(default=None, repr=False)
    source_shape: tuple | None = None        # the masked shard's shape (its gradient's buffer)
    _places: Tensor | None = field(default=None, repr=False)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def global_order(self) -> Tensor:
        """The permutation putting the all-gathered rows (rank by rank) in one-process order."""
        if self._order is None:
            self._order = torch.argsort(_gather_rows(self.keys, 0, self))
        return self._order


class TokenRows(torch.Tensor):
    """This rank's rows of a selection: ``_local`` holds n_r rows at ``dim`` (global size n).
    ``index``: None, -1 (the values are local row numbers of ``order.token``) or a column c of
    the last dim that is (``nonzero``'s output: one column per input dim)."""

    _local: Tensor
    order: RowOrder
    dim: int
    index: int | None
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, local: Tensor, order: RowOrder, dim: int, index: int | None = None):
        shape = list(local.shape)
        shape[dim] = order.total
        out = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=local.dtype, device=local.device,
                                                  requires_grad=False)
        out._local, out.order, out.dim, out.index = local, order, dim, index
        return out

    @property
    def placement(self):
        """The core's placement of this value (``index`` set: a column or the whole is a RowIndex)."""
        rows = Rows(self.dim, 1, 1, self.order.name)
        if self.index is None:
            return rows
        return RowIndex(rows, self.order.token.pre, self.order.token.post, "")

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"TokenRows(local={tuple(self._local.shape)}, n={self.order.total}, order={self.order.name})"

    @classmethod
    @torch._disable_dynamo          # eager rules run below Dynamo, as SequenceShard's do
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return dispatch(func, args, kwargs or {})


# -- moving between local and global ---------------------------------------------------------------------
def _global_token_index(local_idx: Tensor, spec: ShardSpec) -> Tensor:
    """Local row numbers of a token dim (pre, S/P, post) → global row numbers (pre, S, post)."""
    P, S = spec.P, spec.S
    S_l = S // P
    positions = local_positions(spec.schedule, spec.rank, P, S, device=local_idx.device)
    p, rem = local_idx // (S_l * spec.post), local_idx % (S_l * spec.post)
    return p * (S * spec.post) + positions[rem // spec.post] * spec.post + rem % spec.post


def _group_size(order: RowOrder) -> int:
    return order.token.P


def _gather_rows(local: Tensor, dim: int, order: RowOrder) -> Tensor:
    """Every rank's rows at ``dim``, rank by rank (an all-gather padded to the largest count)."""
    P, most = _group_size(order), max(order.counts)
    moved = local.movedim(dim, 0).contiguous()
    pad = moved.new_zeros((most - moved.shape[0], *moved.shape[1:]))
    padded = torch.cat([moved, pad]) if pad.shape[0] else moved
    every = _c10d.wait_tensor(_c10d.all_gather_into_tensor(padded, P, order.token.group_name))
    parts = every.view(P, most, *moved.shape[1:])
    return torch.cat([parts[r, :c] for r, c in enumerate(order.counts)]).movedim(0, dim)


def full_rows(t: TokenRows) -> Tensor:
    """The one-process value of ``t`` (all-gathered, in one-process order; token indices global)."""
    local = t._local
    if t.index == -1:
        local = _global_token_index(local, t.order.token)
    elif t.index is not None:
        local = local.clone()
        local[..., t.index] = _global_token_index(local[..., t.index], t.order.token)
    return _gather_rows(local, t.dim, t.order).index_select(t.dim, t.order.global_order())


def nonzero_rows(x: SequenceShard) -> TokenRows:
    """``nonzero`` of a shard, taken locally: [n_r, x.dim()] coordinates of this rank's nonzero
    entries, the token dim's column as local row numbers (``TokenRows.index``)."""
    spec, local = x.spec, x._local
    coords = torch.nonzero(local)
    count = torch.tensor([coords.shape[0]], dtype=torch.int64, device=local.device)
    counts = _c10d.wait_tensor(_c10d.all_gather_into_tensor(count, spec.P, spec.group_name)).tolist()
    glob = coords.clone()
    glob[:, spec.dim] = _global_token_index(coords[:, spec.dim], spec)
    strides = torch.tensor([math.prod(x.shape[i + 1:]) for i in range(x.dim())], device=local.device)
    keys = (glob * strides).sum(-1)                     # where the entry sits in one-process nonzero
    order = RowOrder(f"nonzero{next(_names)}", spec, tuple(counts), keys)
    return TokenRows(coords, order, 0, index=spec.dim)


def masked_rows(x: SequenceShard, mask) -> TokenRows | None:
    """``x[mask]`` with a boolean ``mask`` over ``x``'s leading dims through its sequence dim
    (``logits[labels != -100]``): this rank's selected rows, in local order, keyed by their
    places in the one-process result. None where the mask is not such a mask (the caller plans
    or gathers)."""
    spec = x.spec
    if (mask.dtype != torch.bool or spec.part is not None or (spec.pre, spec.post) != (1, 1)
            or mask.dim() <= spec.dim or tuple(mask.shape) != tuple(x.shape[:mask.dim()])):
        return None
    if isinstance(mask, SequenceShard):
        if (mask.spec.dim, mask.spec.S, mask.spec.schedule, mask.spec.group_name, mask.spec.part) != \
                (spec.dim, spec.S, spec.schedule, spec.group_name, None):
            return None
        local_mask = mask._local
    else:
        local_mask = slice_local(mask, spec)
    rows = x._local[local_mask]
    coords = torch.nonzero(local_mask)
    glob = coords.clone()
    glob[:, spec.dim] = _global_token_index(coords[:, spec.dim], spec)
    strides = torch.tensor([math.prod(mask.shape[i + 1:]) for i in range(mask.dim())], device=coords.device)
    keys = (glob * strides).sum(-1)                   # where the row sits in the one-process x[mask]
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    counts = _c10d.wait_tensor(_c10d.all_gather_into_tensor(count, spec.P, spec.group_name)).tolist()
    order = RowOrder(f"mask{next(_names)}", spec, tuple(counts), keys, local_mask=local_mask,
                     source_shape=tuple(x.shape))
    return TokenRows(rows, order, 0)


def _places(order: RowOrder) -> Tensor:
    """This rank's rows' indices in the one-process result (a plain operand of the selection's
    length is cut with them)."""
    if order._places is None:
        gathered_to_global = torch.empty_like(order.global_order())
        gathered_to_global[order.global_order()] = torch.arange(order.total, device=gathered_to_global.device)
        rank = order.token.rank
        start = sum(order.counts[:rank])
        order._places = gathered_to_global[start:start + order.counts[rank]]
    return order._places


# -- dispatch ----------------------------------------------------------------------------------------------
_RULES: dict[Any, Callable] = {}


_rule = op_registrar(_RULES)


def dispatch(func, args, kwargs):
    flat, _ = tree_flatten((args, kwargs))
    rows = [a for a in flat if isinstance(a, TokenRows)]
    order = rows[0].order
    result = NotImplemented
    if all(r.order is order for r in rows):
        rule = _RULES.get(func)
        if rule is None and torch.Tag.pointwise in func.tags:
            rule = _pointwise
        if rule is not None:
            result = rule(func, order, *args, **kwargs)
    if result is NotImplemented:
        result = _fallback(func, args, kwargs)
    return result


def _fallback(func, args, kwargs):
    """The one-process values of the rows (exact), the op replicated; sequence shards the
    ``SequenceShard`` way (gathered, a write sent home)."""
    if any(isinstance(a, TokenRows) for a in _written(func, args, kwargs)):
        raise RuntimeError(f"seqpar: eager op {func} writes into token-local rows (this rank's rows of a "
                           f"data-dependent selection) in a way seqpar has no rule for")
    order = next(a for a in tree_flatten((args, kwargs))[0] if isinstance(a, TokenRows)).order
    warn_gather(str(func), "meets token-local rows (MoE token lists) it has no rule for", order.token)
    plain = tree_map(lambda a: full_rows(a) if isinstance(a, TokenRows) else a, (args, kwargs))
    if any(isinstance(a, SequenceShard) for a in tree_flatten(plain)[0]):
        from .sequence_shard_rules import dispatch as shard_dispatch
        return shard_dispatch(func, plain[0], plain[1])
    return func(*plain[0], **plain[1])


def _written(func, args, kwargs) -> list:
    from .gathered_view import written_arguments
    return list(written_arguments(func, args, kwargs))


def _wrap(value, order, dim, index=None):
    return TokenRows(value, order, dim, index) if isinstance(value, Tensor) else value


def _loc(v):
    return v._local if isinstance(v, (TokenRows, SequenceShard)) else v


def _inplace(func, args) -> bool:
    return bool(func._schema.arguments) and func._schema.arguments[0].alias_info is not None and \
        func._schema.arguments[0].alias_info.is_write


# elementwise --------------------------------------------------------------------------------------------
def _pointwise(func, order, *args, **kwargs):
    """Rows of one order, aligned from the right, with operands that have no row dim (a plain
    operand broadcasts along it); a sequence shard does not meet them here."""
    flat = tree_flatten((args, kwargs))[0]
    if any(isinstance(a, SequenceShard) for a in flat):
        return NotImplemented
    ours = [a for a in flat if isinstance(a, TokenRows)]
    offsets = {a.ndim - a.dim for a in ours}
    if len(offsets) != 1:
        return NotImplemented
    k = offsets.pop()
    cut = {}
    for a in flat:
        if isinstance(a, Tensor) and not isinstance(a, TokenRows) and a.ndim >= k and a.shape[a.ndim - k] != 1:
            if a.shape[a.ndim - k] != order.total or _inplace(func, args) and a is args[0]:
                return NotImplemented
            # a plain value with one entry per row of the selection (a sum's gradient expanded
            # over the rows): this rank's rows of it
            cut[id(a)] = a.index_select(a.ndim - k, _places(order).to(a.device))

    def local(v):
        return cut.get(id(v), _loc(v)) if isinstance(v, Tensor) else v
    out = func(*tree_map(local, args), **tree_map(local, kwargs))
    if _inplace(func, args) and isinstance(args[0], TokenRows):
        return args[0]
    keep = ours[0].index if func in _PRESERVING and len(ours) == 1 else None
    return tree_map(lambda o: _wrap(o, order, o.ndim - k, keep) if isinstance(o, Tensor) else o, out)


# ops that copy or alias a value: a token index stays one
_PRESERVING = {aten.detach.default, aten.alias.default, aten.clone.default, aten._to_copy.default}
for _op in _PRESERVING:
    _RULES[_op] = _pointwise


@_rule(aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default)
def _like(func, order, x, *args, **kwargs):
    return _wrap(func(x._local, *args, **kwargs), order, x.dim)


@_rule(aten.new_zeros.default, aten.new_empty.default, aten.new_ones.default, aten.new_full.default)
def _new_buffer(func, order, x, size, *args, **kwargs):
    """A constant buffer is right in any layout: shaped like ``x`` it is rows of the order, with
    the token dim at full length a shard of it (autograd's buffer for ``x[idx]``'s gradient),
    else a plain tensor."""
    size = list(size)
    token = order.token
    if order.source_shape is not None and tuple(size) == order.source_shape:
        # the masked shard's shape (autograd's buffer for x[mask]'s gradient), even where the
        # number of selected rows happens to equal the sequence length
        size[token.dim] = size[token.dim] // token.global_size * token.local_length
        return SequenceShard(func(x._local, size, *args, **kwargs), token)
    if len(size) == x.ndim and size[x.dim] == x.shape[x.dim]:    # the rows' count at their dim: rows
        size[x.dim] = x._local.shape[x.dim]
        return _wrap(func(x._local, size, *args, **kwargs), order, x.dim)
    if token.global_size in size:
        if len(size) == x.ndim and size[x.dim] == token.global_size and \
                size[:x.dim] + size[x.dim + 1:] == list(x.shape[:x.dim] + x.shape[x.dim + 1:]):
            d = x.dim       # ``x[idx]``'s gradient buffer: the rows' dim at the tokens' length
        elif len(size) > token.dim and size[token.dim] == token.global_size:
            d = token.dim
        else:
            d = size.index(token.global_size)
        size[d] //= token.P
        return SequenceShard(func(x._local, size, *args, **kwargs), token.moved(d))
    return func(x._local, size, *args, **kwargs)


# shapes ------------------------------------------------------------------------------------------------
@_rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(func, order, x, size):
    """A view that keeps the row dim one dim (same product of sizes before it)."""
    size = list(size)
    if -1 in size:
        known = math.prod(s for s in size if s != -1)
        size[size.index(-1)] = x.numel() // known if known else 0
    before = math.prod(x.shape[:x.dim])
    for o in range(len(size)):
        if math.prod(size[:o]) == before and size[o] == x.shape[x.dim]:
            size[o] = x._local.shape[x.dim]
            local = x._local.view(size) if func is aten.view.default else x._local.reshape(size)
            return _wrap(local, order, o, x.index if x.index == -1 else None)
    return NotImplemented


@_rule(aten.expand.default)
def _expand(func, order, x, size, implicit=False):
    size = list(size)
    d = x.dim + len(size) - x.ndim
    size[d] = -1
    return _wrap(x._local.expand(size), order, d)


@_rule(aten.t.default, aten.transpose.int, aten.permute.default)
def _transpose(func, order, x, *dims):
    nd = x.ndim
    if func is aten.t.default:
        perm = list(range(nd))[::-1]
    elif func is aten.transpose.int:
        perm = list(range(nd))
        a, b = dims[0] % nd, dims[1] % nd
        perm[a], perm[b] = perm[b], perm[a]
    else:
        perm = [d % nd for d in dims[0]]
    return _wrap(func(x._local, *dims), order, perm.index(x.dim), x.index if x.index == -1 else None)


@_rule(aten.unsqueeze.default)
def _unsqueeze(func, order, x, d):
    d = d % (x.ndim + 1)
    return _wrap(x._local.unsqueeze(d), order, x.dim + (d <= x.dim), x.index if x.index == -1 else None)


@_rule(aten.squeeze.dim, aten.squeeze.dims)
def _squeeze(func, order, x, dims):
    dims = [d % x.ndim for d in ([dims] if isinstance(dims, int) else dims)]
    if x.dim in dims:
        return NotImplemented
    dims = [d for d in dims if x.shape[d] == 1]
    return _wrap(x._local.squeeze(dims) if dims else x._local.view_as(x._local), order,
                 x.dim - sum(d < x.dim for d in dims), x.index if x.index == -1 else None)


def _column_index(x: TokenRows, dim: int, picked: int) -> int | None:
    """The index flag of a piece of ``x`` taken at position ``picked`` of a non-row ``dim``."""
    if x.index == -1:
        return -1
    if x.index is not None and dim == x.ndim - 1:
        return -1 if picked == x.index else None
    return None


@_rule(aten.select.int)
def _select(func, order, x, dim, i):
    dim = dim % x.ndim
    if dim == x.dim:
        return NotImplemented
    return _wrap(x._local.select(dim, i), order, x.dim - (dim < x.dim), _column_index(x, dim, i % x.shape[dim]))


@_rule(aten.unbind.int)
def _unbind(func, order, x, dim=0):
    dim = dim % x.ndim
    if dim == x.dim:
        return NotImplemented
    return [_wrap(p, order, x.dim - (dim < x.dim), _column_index(x, dim, i)) for i, p in
            enumerate(x._local.unbind(dim))]


@_rule(aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor, aten.narrow.default)
def _split(func, order, x, *args, **kwargs):
    """Pieces along a dim that is not the row dim keep every row."""
    dims = {aten.split.Tensor: 1, aten.split_with_sizes.default: 1, aten.slice.Tensor: 0, aten.narrow.default: 0}
    i = dims[func]
    dim = args[i] if len(args) > i else kwargs.get("dim", 0)
    if dim % x.ndim == x.dim or x.index is not None:
        return NotImplemented
    out = func(x._local, *args, **kwargs)
    return tree_map(lambda o: _wrap(o, order, x.dim) if isinstance(o, Tensor) else o, out)


@_rule(aten.cat.default)
def _cat(func, order, tensors, dim=0):
    if not all(isinstance(t, TokenRows) and t.dim == tensors[0].dim and t.index is None for t in tensors):
        return NotImplemented
    if dim % tensors[0].ndim == tensors[0].dim:
        return NotImplemented
    return _wrap(torch.cat([t._local for t in tensors], dim), order, tensors[0].dim)


@_rule(aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default)
def _sum(func, order, x, dims=None, keepdim=False, *, dtype=None):
    """Over other dims the rows stay; over the row dim, this rank's part of the sum over the
    group's rows (a weight's gradient): summed over the group. A mean is that sum over the
    global count (ranks hold different numbers of rows)."""
    nd = x.ndim
    dims = list(range(nd)) if not dims else [d % nd for d in ([dims] if isinstance(dims, int) else dims)]
    local = x._local.sum(dims, keepdim=keepdim, dtype=dtype)
    if func in (aten.mean.dim, aten.mean.default):
        local = local / math.prod(x.shape[d] for d in dims)
    if x.dim in dims:
        return grad_sum(local, x.order.token)
    return _wrap(local, order, x.dim if keepdim else x.dim - sum(d < x.dim for d in dims))


# matmuls -------------------------------------------------------------------------------------------------
@_rule(aten.mm.default)
def _mm(func, order, a, b):
    """Rows of ``a`` stay rows; rows of ``b`` are contracted only against rows of ``a`` (a
    weight's gradient: summed over the group)."""
    if isinstance(a, SequenceShard) or isinstance(b, SequenceShard):
        return NotImplemented
    ra, rb = isinstance(a, TokenRows), isinstance(b, TokenRows)
    if ra and rb:
        if a.dim == 1 and b.dim == 0:
            return grad_sum(torch.mm(a._local, b._local), order.token)
        return NotImplemented
    if ra:
        return _wrap(torch.mm(a._local, b), order, a.dim)
    return _wrap(torch.mm(a, b._local), order, b.dim)


@_rule(aten.addmm.default)
def _addmm(func, order, bias, a, b, *, beta=1, alpha=1):
    if isinstance(bias, TokenRows) or not isinstance(a, TokenRows) or a.dim != 0 or isinstance(b, TokenRows):
        return NotImplemented
    return _wrap(torch.addmm(bias, a._local, b, beta=beta, alpha=alpha), order, 0)


# between a shard and its own rows -------------------------------------------------------------------------
def _indexes(idx, src: SequenceShard, dim: int) -> bool:
    """``idx`` holds local row numbers of ``src``'s token dim ``dim``."""
    if not (isinstance(idx, TokenRows) and idx.index == -1 and idx.ndim == 1 and isinstance(src, SequenceShard)):
        return False
    t, s = idx.order.token, src.spec
    return dim == s.dim and (t.pre, t.post, t.S, t.schedule, t.group_name) == (s.pre, s.post, s.S, s.schedule,
                                                                              s.group_name)


@_rule(aten.index.Tensor)
def _index(func, order, src, indices):
    """``x[idx, pos]``: a shard's own rows by its token index, other dims by rows of the same
    order (1-D, indexing adjacent leading dims): rows of the order at the first indexed dim."""
    used = [d for d, i in enumerate(indices) if i is not None]
    if not isinstance(src, SequenceShard) or used != list(range(len(used))) or src.spec.dim not in used:
        return NotImplemented
    if not _indexes(indices[src.spec.dim], src, src.spec.dim):
        return NotImplemented
    if any(not (isinstance(i, TokenRows) and i.ndim == 1) for i in indices if i is not None):
        return NotImplemented
    return _wrap(src._local[tuple(i._local for i in indices)], order, 0)


@_rule(aten.index_select.default)
def _index_select(func, order, src, dim, idx):
    if not _indexes(idx, src, dim % src.ndim):
        return NotImplemented
    return _wrap(src._local.index_select(dim, idx._local), order, dim % src.ndim)


@_rule(aten.index_add.default, aten.index_add_.default)
def _index_add(func, order, dst, dim, idx, source, *, alpha=1):
    """Each rank adds its rows into its own rows of the shard."""
    dim = dim % dst.ndim
    if not (_indexes(idx, dst, dim) and isinstance(source, TokenRows) and source.dim == dim):
        return NotImplemented
    out = func(dst._local, dim, idx._local, source._local, alpha=alpha)
    return dst if func is aten.index_add_.default else SequenceShard(out, dst.spec)


@_rule(aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)
def _index_put(func, order, dst, indices, values, accumulate=False, *rest):
    """``dst[idx, pos] = / += rows``: a shard's own rows (autograd's gradient of ``x[idx, pos]``),
    or ``dst[mask] += rows`` of the selection that mask made (the gradient of ``x[mask]``)."""
    if _by_own_mask(order, dst, indices, values):
        local_mask = order.local_mask
        out = func(dst._local, [local_mask], values._local, accumulate, *rest)
        return SequenceShard(out, dst.spec) if func is aten.index_put.default else dst
    used = [d for d, i in enumerate(indices) if i is not None]
    if not isinstance(dst, SequenceShard) or used != list(range(len(used))) or dst.spec.dim not in used:
        return NotImplemented
    if not _indexes(indices[dst.spec.dim], dst, dst.spec.dim) or any(
            not (isinstance(i, TokenRows) and i.ndim == 1) for i in indices if i is not None):
        return NotImplemented
    if isinstance(values, TokenRows) and values.dim != 0:
        return NotImplemented
    out = func(dst._local, [None if i is None else i._local for i in indices], _loc(values), accumulate, *rest)
    return SequenceShard(out, dst.spec) if func is aten.index_put.default else dst


def _by_own_mask(order: RowOrder, dst, indices, values) -> bool:
    """``dst[mask]`` where ``values`` are the rows ``masked_rows`` selected with this mask from a
    shard laid out as ``dst``: the same local mask picks the same rows in the same order."""
    local_mask = order.local_mask
    if local_mask is None or not isinstance(dst, SequenceShard) or not isinstance(values, TokenRows) \
            or values.dim != 0 or len(indices) != 1 or not isinstance(indices[0], Tensor):
        return False
    mask, spec = indices[0], order.token
    if (dst.spec.dim, dst.spec.S, dst.spec.schedule, dst.spec.group_name, dst.spec.part, dst.spec.pre,
            dst.spec.post) != (spec.dim, spec.S, spec.schedule, spec.group_name, None, 1, 1):
        return False
    if isinstance(mask, SequenceShard):
        mine = mask._local if mask.spec.dim == spec.dim else None
    else:
        mine = slice_local(mask, spec) if mask.dim() > spec.dim and mask.shape[spec.dim] == spec.S else None
    return mine is not None and mine.shape == local_mask.shape and bool(torch.equal(mine, local_mask))


# softmax along a dim that is not the rows', and losses over rows --------------------------------------
@_rule(aten._softmax.default, aten._log_softmax.default)
def _softmax(func, order, x, dim, half_to_float):
    if dim % x.ndim == x.dim:
        return NotImplemented
    return _wrap(func(x._local, dim, half_to_float), order, x.dim)


@_rule(aten._softmax_backward_data.default, aten._log_softmax_backward_data.default)
def _softmax_backward(func, order, grad, output, dim, input_dtype):
    """The gradient may arrive as rows or as a plain value with one entry per row (a mean's
    gradient expanded over them): this rank's rows of it."""
    if not isinstance(output, TokenRows) or dim % output.ndim == output.dim:
        return NotImplemented
    rows = _rows_of(grad, order, output.dim)
    if rows is None:
        return NotImplemented
    return _wrap(func(rows, output._local, dim, input_dtype), order, output.dim)


def _rows_of(value, order: RowOrder, dim: int):
    """This rank's rows of ``value`` at ``dim``: rows of the order as they are, a plain value
    with one entry per row of the selection cut at this rank's places; else None."""
    if isinstance(value, TokenRows):
        return value._local if value.order is order and value.dim == dim else None
    if isinstance(value, Tensor) and not isinstance(value, SequenceShard) and value.dim() > dim \
            and value.shape[dim] == order.total:
        return value.index_select(dim, _places(order).to(value.device))
    return None


def _own_targets(target, order: RowOrder):
    """A loss's (or gather's) per-row operand for this rank's rows at dim 0."""
    return _rows_of(target, order, 0)


@_rule(aten.gather.default)
def _gather(func, order, x, dim, index, *, sparse_grad=False):
    """``rows.gather(-1, targets)`` (per-token log-probs of selected rows): along a dim that is not
    the rows', with the targets cut to this rank's rows."""
    idx = _own_targets(index, order)
    if not isinstance(x, TokenRows) or x.dim != 0 or dim % x.ndim == 0 or idx is None:
        return NotImplemented
    return _wrap(func(x._local, dim, idx, sparse_grad=sparse_grad), order, 0)


@_rule(aten.scatter_add.default, aten.scatter_add_.default)
def _scatter_add(func, order, dst, dim, index, src):
    """``rows.scatter_add(-1, targets, values)`` (the gradient of ``gather`` above): along a dim
    that is not the rows', targets and values cut to this rank's rows."""
    idx, values = _own_targets(index, order), _own_targets(src, order)
    if not isinstance(dst, TokenRows) or dst.dim != 0 or dim % dst.ndim == 0 or idx is None or values is None:
        return NotImplemented
    out = func(dst._local, dim, idx, values)
    return dst if func is aten.scatter_add_.default else _wrap(out, order, 0)


@_rule(aten.nll_loss_forward.default)
def _nll_forward(func, order, x, target, weight, reduction, ignore_index):
    """Cross entropy over selected rows (``F.cross_entropy(logits[mask], labels[mask])``): local
    sums and counts summed over the group, ``mean`` by the global count."""
    t = _own_targets(target, order)
    if not isinstance(x, TokenRows) or x.dim != 0 or x.ndim != 2 or t is None or isinstance(weight, TokenRows):
        return NotImplemented
    if reduction == 0:
        out, tw = func(x._local, t, weight, 0, ignore_index)
        return _wrap(out, order, 0), tw
    return group_loss(func, x._local, t, weight, reduction, ignore_index, order.token)


@_rule(aten.nll_loss_backward.default)
def _nll_backward(func, order, grad, x, target, weight, reduction, ignore_index, total_weight):
    t = _own_targets(target, order)
    if not isinstance(x, TokenRows) or x.dim != 0 or t is None:
        return NotImplemented
    if reduction == 0:
        grad = _own_targets(grad, order)
        if grad is None:
            return NotImplemented
    return _wrap(func(grad, x._local, t, weight, reduction, ignore_index, total_weight), order, 0)
