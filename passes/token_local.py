"""Token-local regions: mixture-of-experts routing on each rank's own tokens.

An MoE layer routes every token independently: sort the (token, slot) entries by expert id,
gather each entry's hidden row, run each expert's rows through a grouped matmul, undo the
sort, sum a token's slots. Every rank can do exactly that on the tokens it holds: the local
sort is a permutation of its own entries, the grouped matmul's offsets are the local counts,
and undoing the local sort puts the rows back in the layout's order. Only statistics that sum
over all tokens (a router's load-balancing loss) need the group.

Placements (``placement.py``) that say so, read and written here only:
  * ``Rows(dim, pre, post, order)``: this rank's rows of a token dim in the order of local
    sort ``order``;
  * ``RowIndex(at, pre, post, into)``: integer values indexing this rank's rows of a token dim
    (merged factors pre, post) in order ``into`` ("" = the layout's), positioned as ``at``;
  * ``RowCount(order)``: this rank's part of a count over the rows of ``order``.

What each op does with them (anything else with such an input raises ``Refuted``):
  sort / argsort along a token dim    values ``Rows``, indices ``RowIndex`` (a permutation)
  x[idx]  (idx a RowIndex into x's rows)   x's rows picked locally, placed as idx is
  idx // c  (c divides post)          an index into the (token, slot) rows → into token rows
  pointwise on Rows of one order (and operands without the token dim), on RowIndex only the
      division above, on RowCount (dtype casts)
  histc / bincount of a token-local or sharded value    ``RowCount`` (local counts)
  cumsum of a RowCount                ``RowCount``
  grouped matmul (rows of order o, offsets RowCount(o))  ``Rows`` of order o
  empty_like / zeros_like             placed as their input
  inv[perm] = arange(n), argsort(perm)    the inverse permutation, computed locally

Why ``Refuted`` and not a gather: a ``Rows`` value has no global order to gather into. When one
meets an op that needs where its rows sit (a view that unmerges the token dim, a replicated
operand of full length, the frame's output), the rewrite forgets that sort's order and rewrites
the graph again with the sort taken the usual way (gathered and warned: exact, slower).
Capacity-limited routing (which tokens an expert keeps depends on the global order) never fits
these rules: it keeps the gather.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .placement import TOKEN_LOCAL, Replicate, RowCount, RowIndex, Rows, Shard

__all__ = ["Refuted", "applies", "token_local_rule", "check_exit"]


class Refuted(Exception):
    """A token-local value reached an op that needs where its rows sit."""

    def __init__(self, orders: set, why: str):
        super().__init__(why)
        self.orders = orders


_SORTS = {torch.sort, torch.argsort, ("method", "sort"), ("method", "argsort")}
_COUNTS = {torch.histc, torch.bincount, ("method", "histc"), ("method", "bincount")}
_LIKE = {torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like}
_CASTS = {"float", "int", "long", "to", "type", "type_as", "contiguous", "clone", "detach", "double", "half",
          "bfloat16", "bool"}


def _key(node: fx.Node):
    return ("method", node.target) if node.op == "call_method" else node.target


def _local_kind(pl) -> bool:
    if isinstance(pl, tuple):
        return any(_local_kind(p) for p in pl)
    return isinstance(pl, TOKEN_LOCAL)


def _orders(pl) -> set:
    if isinstance(pl, tuple):
        return set().union(*(_orders(p) for p in pl)) if pl else set()
    if isinstance(pl, Rows):
        return {pl.order}
    if isinstance(pl, RowIndex):
        return {o for o in (pl.into, pl.at.order if isinstance(pl.at, Rows) else "") if o}
    if isinstance(pl, RowCount):
        return {pl.order} if pl.order else set()
    return set()


def _sort_dim(node: fx.Node) -> int:
    args = node.args[1:]
    if args and isinstance(args[0], int):
        return args[0]
    return node.kwargs.get("dim", -1)


def applies(ctx, node: fx.Node) -> bool:
    """``node`` reads a token-local value, or is a sort that starts one (a sort along the token
    dim of a sharded value whose order has not been refuted)."""
    if any(_local_kind(ctx.placement_of(a)) for a in node.all_input_nodes):
        return True
    if _key(node) not in _SORTS or node.name in ctx.refuted or not node.args:
        return False
    pl = ctx.placement_of(node.args[0])
    ex = ctx.example(node.args[0])
    return (type(pl) is Shard and isinstance(ex, torch.Tensor) and ex.dim() > 0
            and _sort_dim(node) % ex.dim() == pl.dim)


def check_exit(ctx, value) -> None:
    """A token-local value cannot leave the frame: refute its order."""
    def visit(a):
        pl = ctx.placement_of(a)
        if _local_kind(pl):
            raise Refuted(_orders(pl), f"a value in a local row order ({pl}) is an output of the frame")
        return a
    fx.node.map_arg(value, visit)


def token_local_rule(ctx, node: fx.Node):
    """``(new node, placement)`` for ``node``; raises ``Refuted`` when no rule fits."""
    inputs = [ctx.placement_of(a) for a in node.all_input_nodes]
    involved = set().union(*(_orders(p) for p in inputs)) if inputs else set()
    try:
        result = _dispatch(ctx, node)
    except _NoFit as err:
        if not involved:                       # a starting sort that does not fit: the usual rules
            return None
        raise Refuted(involved, f"{_describe(node)}: {err}") from None
    return result


class _NoFit(Exception):
    pass


def _describe(node: fx.Node) -> str:
    t = node.target
    return f"Tensor.{t}" if isinstance(t, str) else getattr(t, "__name__", str(t))


def _env(ctx, value):
    return fx.node.map_arg(value, lambda a: ctx.env[a])


def _dispatch(ctx, node: fx.Node):
    key = _key(node)
    if key in _SORTS:
        return _sort(ctx, node)
    if node.target is operator.getitem:
        return _getitem(ctx, node)
    if node.target is operator.setitem:
        return _inverse_permutation(ctx, node)
    if key in _COUNTS:
        return _count(ctx, node)
    if key in (torch.cumsum, ("method", "cumsum")):
        return _cumsum(ctx, node)
    if "grouped_mm" in str(getattr(node.target, "__name__", node.target)):
        return _grouped_mm(ctx, node)
    if key in _LIKE:
        pl = ctx.placement_of(node.args[0])
        return ctx.emit(node.target, _env(ctx, node.args), _env(ctx, node.kwargs), pl, op=node.op), pl
    if node.op == "call_method" and node.target == "unsqueeze":
        return _unsqueeze(ctx, node)
    if key in _SPLITS:
        return _split(ctx, node)
    if key in _VIEWS:
        return _view(ctx, node)
    if key in (("method", "transpose"), torch.transpose):
        return _transpose(ctx, node)
    if (node.op == "call_method" and node.target in _CASTS) or node.target in (torch.clone,):
        pl = ctx.placement_of(node.args[0])
        if any(_local_kind(ctx.placement_of(a)) for a in node.all_input_nodes[1:]):
            raise _NoFit("a cast to the type of another token-local value")
        return ctx.emit(node.target, _env(ctx, node.args), _env(ctx, node.kwargs), pl, op=node.op), pl
    return _pointwise(ctx, node)


def _sort(ctx, node: fx.Node):
    x = node.args[0]
    pl = ctx.placement_of(x)
    ex = ctx.example(x)
    argsort = _key(node) in (torch.argsort, ("method", "argsort"))
    new = ctx.emit(node.target, _env(ctx, node.args), _env(ctx, node.kwargs), None, op=node.op)
    if isinstance(pl, RowIndex) and argsort and _sort_dim(node) % ex.dim() == pl.at.dim:
        # argsort of a permutation is its inverse: positions in the order its values index,
        # values indexing the order its positions are in
        at = pl.at
        positions = Rows(at.dim, pl.pre, pl.post, pl.into) if pl.into else Shard(at.dim, pl.pre, pl.post)
        return _placed(new, RowIndex(positions, at.pre, at.post, at.order if isinstance(at, Rows) else ""))
    if type(pl) is Shard:
        into = ""
    elif isinstance(pl, Rows):
        into = pl.order
    else:
        raise _NoFit("sorting a value that is not a row of tokens")
    if _sort_dim(node) % ex.dim() != pl.dim:
        raise _NoFit("sorting along a dim that is not the token dim")
    rows = Rows(pl.dim, pl.pre, pl.post, node.name)
    index = RowIndex(rows, pl.pre, pl.post, into)
    return _placed(new, index if argsort else (rows, index))


def _placed(new: fx.Node, pl):
    new.meta["seqpar_placement"] = pl
    return new, pl


def _getitem(ctx, node: fx.Node):
    container, index = node.args
    pl = ctx.placement_of(container)
    if isinstance(pl, tuple) and isinstance(index, int):
        return _placed(ctx.emit(operator.getitem, (ctx.env[container], index)), pl[index])
    items = list(index) if isinstance(index, tuple) else [index]
    if items and isinstance(items[0], fx.Node) and all(i is None or i == slice(None) for i in items[1:]):
        return _take_rows(ctx, node, container, items[0], items[1:])
    if all(i == slice(None) or i is None or i is Ellipsis for i in items) and not _local_kind(
            [ctx.placement_of(i) for i in items if isinstance(i, fx.Node)] or Replicate()):
        return _basic_index(ctx, node, container, items)
    raise _NoFit("indexing a token-local value this way")


def _take_rows(ctx, node, container, idx_node, rest):
    """``x[idx, ...]``: rows of x picked by a RowIndex into them."""
    idx = ctx.placement_of(idx_node)
    x = ctx.placement_of(container)
    if not isinstance(idx, RowIndex) or any(i is not None and i != slice(None) for i in rest):
        raise _NoFit("indexing rows with something that is not a local row index")
    if isinstance(x, RowIndex):
        src_pre, src_post, src_order, src_dim = x.at.pre, x.at.post, (x.at.order if isinstance(x.at, Rows) else ""), x.at.dim
    elif isinstance(x, (Shard, Rows)):
        src_pre, src_post, src_order, src_dim = x.pre, x.post, (x.order if isinstance(x, Rows) else ""), x.dim
    else:
        raise _NoFit("picking rows of a value that is not a row of tokens")
    if src_dim != 0 or (src_pre, src_post, src_order) != (idx.pre, idx.post, idx.into):
        raise _NoFit("the index does not index this value's rows")
    at = idx.at
    extra = sum(1 for i in rest if i is None)
    if extra and at.dim != ctx.example(idx_node).dim() - 1:
        raise _NoFit("new dims inserted before the rows")
    new = ctx.emit(operator.getitem, (ctx.env[container], _env(ctx, node.args[1])))
    if isinstance(x, RowIndex):              # an index array read through another: a composition
        return _placed(new, RowIndex(at, x.pre, x.post, x.into))
    return _placed(new, at)


def _basic_index(ctx, node, container, items):
    """``x[..., None]`` style indexing that leaves the token dim whole."""
    pl = ctx.placement_of(container)
    ex, out = ctx.example(container), ctx.example(node)
    dim = _dim_of(pl)
    if dim is None or out.dim() - ex.dim() != sum(1 for i in items if i is None):
        raise _NoFit("basic indexing of a token-local value")
    before = 0
    consumed = 0
    for i in items:
        if i is Ellipsis:
            break
        if i is None:
            before += 1
        else:
            consumed += 1
            if consumed > dim:
                break
    new_pl = _moved(pl, dim + before if consumed <= dim else dim)
    return _placed(ctx.emit(operator.getitem, (ctx.env[container], _env(ctx, node.args[1]))), new_pl)


def _dim_of(pl):
    if isinstance(pl, (Shard, Rows)):
        return pl.dim
    if isinstance(pl, RowIndex):
        return pl.at.dim
    return None


def _moved(pl, dim: int):
    if isinstance(pl, Rows):
        return Rows(dim, pl.pre, pl.post, pl.order)
    if isinstance(pl, Shard):
        return Shard(dim, pl.pre, pl.post)
    if isinstance(pl, RowIndex):
        return RowIndex(_moved(pl.at, dim), pl.pre, pl.post, pl.into)
    raise _NoFit(f"moving {pl}")


_SPLITS = {("method", "chunk"), ("method", "split"), torch.chunk, torch.split, ("method", "tensor_split"),
           torch.tensor_split}
_VIEWS = {("method", "view"), ("method", "reshape"), torch.reshape, ("method", "flatten"), torch.flatten,
          ("method", "view_as"), ("method", "reshape_as")}


def _split(ctx, node):
    """chunk / split along a dim that is not the token dim: every piece keeps the rows."""
    pl = ctx.placement_of(node.args[0])
    nd = ctx.example(node.args[0]).dim()
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if _dim_of(pl) is None or dim % nd == _dim_of(pl):
        raise _NoFit("splitting the token dim of rows in a local order")
    pieces = ctx.example(node)
    return _placed(ctx.emit(node.target, _env(ctx, node.args), _env(ctx, node.kwargs), op=node.op),
                   tuple(pl for _ in pieces))


def _view(ctx, node):
    """A view that keeps the token dim whole (its merged factors unchanged)."""
    from .placement import local_view_shape, view_placement
    pl = ctx.placement_of(node.args[0])
    src, dst = tuple(ctx.example(node.args[0]).shape), tuple(ctx.example(node).shape)
    dim = _dim_of(pl)
    base = pl.at if isinstance(pl, RowIndex) else pl
    if dim is None:
        raise _NoFit("a view of a count")
    moved = view_placement(src, dst, Shard(dim, base.pre, base.post), ctx.S)
    if moved is None or (moved.pre, moved.post) != (base.pre, base.post):
        raise _NoFit(f"view {src} -> {dst} regroups the rows of a local order")
    shape = local_view_shape(dst, moved, ctx.P)
    return _placed(ctx.emit("reshape", (ctx.env[node.args[0]], shape), op="call_method"), _moved(pl, moved.dim))


def _transpose(ctx, node):
    pl = ctx.placement_of(node.args[0])
    nd = ctx.example(node.args[0]).dim()
    d0, d1 = (a % nd for a in node.args[1:3])
    dim = _dim_of(pl)
    if dim is None:
        raise _NoFit("a transpose of a count")
    new_dim = d1 if dim == d0 else d0 if dim == d1 else dim
    return _placed(ctx.emit(node.target, _env(ctx, node.args), _env(ctx, node.kwargs), op=node.op),
                   _moved(pl, new_dim))


def _unsqueeze(ctx, node):
    pl = ctx.placement_of(node.args[0])
    nd = ctx.example(node.args[0]).dim()
    d = (node.args[1] if len(node.args) > 1 else node.kwargs["dim"]) % (nd + 1)
    dim = _dim_of(pl)
    if dim is None:
        raise _NoFit("unsqueeze of a count")
    new_pl = _moved(pl, dim + (d <= dim))
    return _placed(ctx.emit("unsqueeze", (ctx.env[node.args[0]], d), op="call_method"), new_pl)


def _pointwise(ctx, node: fx.Node):
    """Elementwise ops: Rows with Rows of one order (and operands without the token dim);
    RowIndex // c (an index into (token, slot) rows → token rows); RowCount casts and sums."""
    from .sharding_rules import _aten_pointwise, POINTWISE_FUNCTIONS, POINTWISE_METHODS
    if not (node.target in POINTWISE_FUNCTIONS or (node.op == "call_method" and node.target in POINTWISE_METHODS)
            or _aten_pointwise(node) or node.target in (operator.floordiv, torch.floor_divide)):
        raise _NoFit("no token-local rule for this op")
    out = ctx.example(node)
    if not isinstance(out, torch.Tensor):
        raise _NoFit("a non-tensor result")
    locals_ = {a: ctx.placement_of(a) for a in node.all_input_nodes if _local_kind(ctx.placement_of(a))}
    kinds = set(locals_.values())
    if len(kinds) != 1:
        raise _NoFit("operands in different local row orders")
    (pl,) = kinds
    if isinstance(pl, RowIndex):
        return _index_arithmetic(ctx, node, pl)
    if isinstance(pl, RowCount):
        others = [a for a in node.all_input_nodes if a not in locals_]
        if any(isinstance(ctx.example(a), torch.Tensor) and ctx.example(a).dim() > 0 for a in others):
            raise _NoFit("a count combined with a tensor")
        return _placed(ctx.emit(node.target, _env(ctx, node.args), _env(ctx, node.kwargs), op=node.op), pl)
    for a in node.all_input_nodes:
        if a in locals_:
            continue
        ex = ctx.example(a)
        if not isinstance(ctx.placement_of(a), Replicate):
            raise _NoFit("rows in a local order meet rows in the layout's order")
        if isinstance(ex, torch.Tensor):
            ad = pl.dim - (out.dim() - ex.dim())
            if ad >= 0 and ex.shape[ad] != 1:
                raise _NoFit("a replicated operand with a token dim meets rows in a local order")
    # the result's token dim: the same right-offset as the operand's
    first = next(iter(locals_))
    dim = pl.dim + out.dim() - ctx.example(first).dim()
    new_pl = _moved(pl, dim)
    return _placed(ctx.emit(node.target, _env(ctx, node.args), _env(ctx, node.kwargs), op=node.op), new_pl)


def _index_arithmetic(ctx, node, pl: RowIndex):
    if node.target not in (operator.floordiv, torch.floor_divide) and not (
            node.op == "call_method" and node.target in ("__floordiv__", "floor_divide", "div")):
        raise _NoFit("arithmetic on local row indices other than // by the slots per token")
    if node.op == "call_method" and node.target == "div" and node.kwargs.get("rounding_mode") != "floor":
        raise _NoFit("true division of local row indices")
    c = node.args[1]
    if not isinstance(c, int) or c <= 0 or pl.post % c:
        raise _NoFit("// by a number that does not divide the slots per token")
    new_pl = RowIndex(pl.at, pl.pre, pl.post // c, pl.into)
    return _placed(ctx.emit(node.target, _env(ctx, node.args), _env(ctx, node.kwargs), op=node.op), new_pl)


def _count(ctx, node: fx.Node):
    """A histogram of token entries: this rank's counts (its part of the group's)."""
    pl = ctx.placement_of(node.args[0])
    if isinstance(pl, Rows):
        order = pl.order
    elif type(pl) is Shard:
        order = ""
    else:
        raise _NoFit("counting a value that is not a row of tokens")
    if any(_local_kind(ctx.placement_of(a)) for a in node.all_input_nodes[1:]):
        raise _NoFit("weights in a local order")
    return _placed(ctx.emit(node.target, _env(ctx, node.args), _env(ctx, node.kwargs), op=node.op), RowCount(order))


def _cumsum(ctx, node: fx.Node):
    pl = ctx.placement_of(node.args[0])
    if not isinstance(pl, RowCount):
        raise _NoFit("a scan over rows in a local order")
    return _placed(ctx.emit(node.target, _env(ctx, node.args), _env(ctx, node.kwargs), op=node.op), pl)


def _grouped_mm(ctx, node: fx.Node):
    """grouped_mm(rows, weight, offs=counts): the rows of each expert, with this rank's counts."""
    x = ctx.placement_of(node.args[0])
    offs = node.kwargs.get("offs", node.args[2] if len(node.args) > 2 else None)
    counts = ctx.placement_of(offs) if isinstance(offs, fx.Node) else None
    order = x.order if isinstance(x, Rows) else "" if type(x) is Shard else None
    if order is None or not isinstance(counts, RowCount) or counts.order != order or x.dim != 0:
        raise _NoFit("a grouped matmul whose offsets are not the counts of its rows' order")
    others = [a for a in node.all_input_nodes if a is not node.args[0] and a is not offs]
    if any(not isinstance(ctx.placement_of(a), Replicate) for a in others):
        raise _NoFit("a grouped matmul with token-local weights")
    args = (ctx.env[node.args[0]], *(ctx.weight(a) if isinstance(a, fx.Node) else a for a in node.args[1:]))
    kwargs = {k: (ctx.env[v] if v is offs else ctx.weight(v) if isinstance(v, fx.Node) else v)
              for k, v in node.kwargs.items()}
    return _placed(ctx.emit(node.target, args, kwargs, op=node.op), x)


def _inverse_permutation(ctx, node: fx.Node):
    """``inv[perm] = arange(n)`` with perm a local sort's indices: inv is the inverse
    permutation, computed with this rank's arange (its rows are the local rows)."""
    dst, idx, value = node.args
    perm = ctx.placement_of(idx) if isinstance(idx, fx.Node) else None
    if not (isinstance(perm, RowIndex) and isinstance(value, fx.Node) and _is_full_arange(ctx, value, perm)):
        raise _NoFit("a write into token-local values that is not an inverse permutation")
    ex = ctx.example(value)
    n_local = ex.shape[0] // ctx.P
    local = ctx.emit(torch.arange, (n_local,), {"device": ex.device, "dtype": ex.dtype})
    new = ctx.emit(operator.setitem, (ctx.env[dst], ctx.env[idx], local))
    at = perm.at
    positions = Rows(at.dim, perm.pre, perm.post, perm.into) if perm.into else Shard(at.dim, perm.pre, perm.post)
    ctx.place[dst] = RowIndex(positions, at.pre, at.post, at.order if isinstance(at, Rows) else "")
    ctx.env[dst].meta["seqpar_placement"] = ctx.place[dst]
    return _placed(new, Replicate())


def _is_full_arange(ctx, value: fx.Node, perm: RowIndex) -> bool:
    if value.target is not torch.arange:
        return False
    args = [a for a in value.args]
    n = perm.pre * ctx.S * perm.post
    return args in ([n], [0, n], [0, n, 1]) and isinstance(ctx.placement_of(value), Replicate)
