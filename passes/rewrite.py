"""Rewrite a Dynamo FX graph so that each rank computes only its shard of the sequence.

Reads: ``node.meta["example_value"]`` (global shapes from Dynamo), ``node.meta["seqpar_attention"]``
(from ``canonicalize``). Writes a new graph whose nodes carry ``node.meta["seqpar_placement"]``.

Walks the graph once in order, keeping for every value its placement (``placement.py``):
  * entry: a user input with a dim of the sequence length stays replicated until an op that
    starts the sharded part of the model (embedding, linear, norm, attention) uses it; there it is
    sharded (``seqpar::shard_sequence``), and replicated uses elsewhere (label shifting) stay exact;
  * each op goes through its sharding rule (``sharding_rules.py``), which emits the local op;
  * a replicated value that meets a shard is sliced in the layout (its gradient is gathered);
    a replicated value that requires grad and meets shards unsliced (a weight) gets its
    gradient summed over the group;
  * an op with sharded inputs and no rule falls back: its inputs are gathered and it runs
    replicated, with a warning naming the op and the source line (an error with
    ``fallback="error"``);
  * exit: sharded outputs are gathered (or left local with ``output="local"``).
"""
from __future__ import annotations

import warnings
from math import prod
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from seqpar_compiler.runtime import local_positions
from seqpar_compiler.runtime.sharding.layout import Layout, layout_of

# op handles for graph nodes (a CustomOpDef is not an FX target)
shard_sequence_op = torch.ops.seqpar.shard_sequence.default
gather_sequence_op = torch.ops.seqpar.gather_sequence.default
from seqpar_compiler.runtime.grad_collectives import shard_sequence_partial, sum_grad_over_group

from .alias_sets import AliasFacts, check_local_aliasing, eliminate_dead_code, is_write
from .hop_bodies import copy_region_meta
from .token_local import Refuted, applies, check_exit, token_local_rule
from .placement import Replicate, SeqRange, Shard, seq_factors

__all__ = ["ShardingContext", "SeqparFallbackError", "call_arguments", "rewrite_graph"]


class SeqparFallbackError(RuntimeError):
    """An op could not be sharded and ``SEQPAR_FALLBACK=error`` forbids the gather fallback."""


def _example(node: Any):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


@dataclass
class ShardingContext:
    """What the rules need: sizes, the layout, and the new graph under construction."""

    S: int
    P: int
    rank: int
    schedule: str
    group_name: str
    fallback: str
    output: str
    kernel: str
    overlap: bool
    grad_reduce: str = "sum"
    seq_inputs: dict = field(default_factory=dict)  # old placeholder -> its sequence dim
    data_inputs: set = field(default_factory=set)   # names of the user's tensor inputs (not model state)
    graph: fx.Graph = field(default_factory=fx.Graph)
    env: dict = field(default_factory=dict)         # old node -> new node
    place: dict = field(default_factory=dict)       # old node -> placement (or tuple of them)
    constants: dict = field(default_factory=dict)   # attribute name -> tensor
    fallbacks: list = field(default_factory=list)   # (op, source line, reason)
    messages: list = field(default_factory=list)    # the fallback warnings, said after the last attempt
    collectives: list = field(default_factory=list)
    facts: Any = None                               # AliasFacts of the graph (alias_sets.py)
    forced: set = field(default_factory=set)        # written storages computed replicated
    refuted: dict = field(default_factory=dict)     # local sort orders that failed -> why (token_local.py)
    emitted: dict = field(default_factory=dict)     # old writing node -> the new nodes its rule emitted
    sourced: dict = field(default_factory=dict)     # (old, dim) -> its rows computed from sliced indices
    _grad_summed: dict = field(default_factory=dict)
    _gathered: dict = field(default_factory=dict)
    _from_data: set = field(default_factory=set)    # replicated values computed from the user's inputs
    parts_gathered: dict = field(default_factory=dict)  # old part -> its gathered new node (range_rules)
    # a part of the sequence (a chunk) may leave the frame as a part (the frame's outputs become
    # SequenceShards: SEQPAR_OUTPUT=gather); else it is gathered at the exit
    parts_leave: bool = False

    # -- values ---------------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        return layout_of(self.schedule)

    def example(self, old: Any):
        return _example(old)

    def placement_of(self, old: Any):
        return self.place.get(old, Replicate()) if isinstance(old, fx.Node) else Replicate()

    def shard_of(self, old: Any) -> Shard | None:
        pl = self.placement_of(old)
        return pl if isinstance(pl, Shard) else None

    def emit(self, target, args, kwargs=None, placement=None, op="call_function") -> fx.Node:
        node = self.graph.create_node(op, target, tuple(args), dict(kwargs or {}))
        node.meta["seqpar_placement"] = placement
        return node

    def full(self, old: Any) -> Any:
        """The new-graph value of ``old`` in full (gathered if sharded)."""
        if not isinstance(old, fx.Node):
            return old
        pl = self.placement_of(old)
        if not isinstance(pl, Shard):
            return self.env[old]
        if self.facts is not None and self.facts.key_of(old) is not None:
            # a value in a written storage: a gather made before a write would be stale after it
            return self._gather(self.env[old], pl, self.example(old).shape)
        if old not in self._gathered:
            self._gathered[old] = self._gather(self.env[old], pl, self.example(old).shape)
        return self._gathered[old]

    def _gather(self, new: fx.Node, pl: Shard, global_shape) -> fx.Node:
        self.collectives.append(f"all-gather {new.name}")
        if pl.plain:
            return self.emit(gather_sequence_op, (new, pl.dim, self.schedule, self.group_name), placement=Replicate())
        # unmerge (pre, S/P, post) (a token grid's band: (pre, rows/P, 1)), gather, merge back
        local = list(global_shape)
        split = local[:pl.dim] + list(seq_factors(pl.pre, pl.post, self.S // self.P)) + local[pl.dim + 1:]
        unmerged = self.emit("reshape", (new, split), op="call_method")
        full = self.emit(gather_sequence_op, (unmerged, pl.dim + 1, self.schedule, self.group_name))
        return self.emit("reshape", (full, list(global_shape)), op="call_method", placement=Replicate())

    def local(self, old: Any, dim: int, pre: int = 1, post: int = 1) -> Any:
        """``old`` as this rank's shard along ``dim``: sharded values as they are, replicated
        values of full sequence length sliced in the layout (gradient gathered). A lookup of
        per-token indices (a learned position embedding) is computed from sliced indices
        instead, so nothing is gathered (``source_slicing``). With pre/post, ``dim`` is a merged
        (pre, sequence, post) dim."""
        if not isinstance(old, fx.Node):
            return old
        pl = self.placement_of(old)
        if isinstance(pl, Shard):
            return self.env[old]
        new = self.env[old]
        if pre == 1 and post == 1:
            from .source_slicing import local_at_source
            at_source = local_at_source(self, old, dim)
            if at_source is not None:
                return at_source
            return self.emit(self._slicer(), (new, dim, self.schedule, self.group_name), placement=Shard(dim))
        shape = list(self.example(old).shape)
        split = shape[:dim] + list(seq_factors(pre, post, self.S)) + shape[dim + 1:]
        local = shape[:dim] + [prod(seq_factors(pre, post, self.S // self.P))] + shape[dim + 1:]
        unmerged = self.emit("reshape", (new, split), op="call_method")
        sliced = self.emit(self._slicer(), (unmerged, dim + 1, self.schedule, self.group_name))
        return self.emit("reshape", (sliced, local), op="call_method", placement=Shard(dim, pre, post))

    def _slicer(self):
        """Issue 13: under grad_reduce="none" the slice's gradient stays partial too (no gather)."""
        return shard_sequence_partial if self.grad_reduce == "none" else shard_sequence_op

    def seed(self, old: Any) -> None:
        """Shard a user input that carries the sequence where a rule first needs it sharded.

        Inputs stay replicated until then, so replicated work on them (HF's label shift:
        ``pad(labels)[..., 1:]``) stays exact and cheap; the result is sliced where it meets shards.
        """
        if isinstance(old, fx.Node) and old in self.seq_inputs and not isinstance(self.placement_of(old), Shard):
            d = self.seq_inputs[old]
            self._gathered[old] = self.env[old]          # the full input stays at hand, for free
            self.env[old] = self.local(old, d)
            self.place[old] = Shard(d)

    def weight(self, old: Any) -> Any:
        """A replicated value used unsliced by sharded computation: its gradient is summed
        (left partial with ``grad_reduce="none"``)."""
        if not isinstance(old, fx.Node):
            return old
        ex = self.example(old)
        if self.grad_reduce == "none" or not (isinstance(ex, torch.Tensor) and ex.requires_grad):
            return self.env[old]
        if old not in self._grad_summed:
            self.collectives.append(f"grad all-reduce {old.name}")
            self._grad_summed[old] = self.emit(sum_grad_over_group, (self.env[old], self.group_name),
                                               placement=Replicate())
        return self._grad_summed[old]

    def constant(self, name: str, value: torch.Tensor) -> fx.Node:
        name = f"_seqpar_{name}_{len(self.constants)}"
        self.constants[name] = value
        return self.emit(name, (), op="get_attr", placement=Shard(0))

    def positions(self, device, dtype) -> torch.Tensor:
        return local_positions(self.schedule, self.rank, self.P, self.S, device=device).to(dtype)

    # -- fallback -------------------------------------------------------------------------
    def fall_back(self, node: fx.Node, reason: str) -> None:
        line = _source_line(node)
        self.fallbacks.append((_op_name(node), line, reason))
        node.meta["seqpar_fallback"] = reason     # read by the replicated-attention report
        message = (f"seqpar: cannot shard {_op_name(node)} ({reason}) at {line}; gathering the sequence "
                   f"and computing it replicated (correct, slower)")
        if self.fallback == "error":
            raise SeqparFallbackError(message.replace("; gathering", ". SEQPAR_FALLBACK=error forbids gathering"))
        self.messages.append(message)          # said by rewrite_graph once its last attempt stands

    def note_exit_gather(self, node: fx.Node) -> None:
        """A part of the sequence (a chunk) returned by the frame is gathered at the exit: frames
        hand whole shards only. Not a fallback (nothing in the frame ran replicated, and the value
        is what the program returns), so ``SEQPAR_FALLBACK=error`` does not refuse it; but what
        reads the chunk afterwards gets it whole on every rank, so it is said once."""
        self.messages.append(f"seqpar: a part of the sequence ({_op_name(node)}) leaves the frame at "
                             f"{_source_line(node)}; every rank gets the whole part (gathered at the exit), "
                             f"so what reads it next runs on all of it (correct)")

    def reset(self, preset: dict) -> None:
        """Back to the state before the walk (placements preset by the frame edges kept), for
        another attempt with more storages forced replicated."""
        self.graph, self.env, self.place = fx.Graph(), {}, dict(preset)
        self.seq_inputs, self.constants, self.fallbacks, self.collectives = {}, {}, [], []
        self.messages, self.emitted, self._grad_summed, self._gathered = [], {}, {}, {}
        self.sourced = {}
        self._from_data = set()
        self.parts_gathered = {}         # new nodes of the discarded attempt's graph


def call_arguments(node: fx.Node, names: list[str], defaults: dict) -> dict:
    """Positional and keyword arguments of ``node`` by name."""
    out = dict(defaults)
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return f"Tensor.{t}"
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


def _source_line(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
    return lines[-1] if lines else f"graph node {node.name}"


def _is_sharded(pl) -> bool:
    if isinstance(pl, tuple):
        return any(_is_sharded(p) for p in pl)
    return isinstance(pl, Shard)


def _map(fn, value):
    return fx.node.map_arg(value, fn)


# Test-only: True shards written storages with no check (the behaviour before the alias check),
# so a test can show the parity check (the verify option) catches a write lost in a copy.
_UNSAFE_NO_ALIAS_CHECK = False


def rewrite_graph(gm: fx.GraphModule, example_inputs, ctx: ShardingContext, input_dims: dict,
                  facts: AliasFacts | None = None) -> fx.GraphModule:
    """Build the sharded graph. ``input_dims`` maps placeholder names to their sequence dim.

    Storages the graph writes are sharded optimistically, then checked: the rewritten graph must
    keep every alias set in one local storage and every write in it (``alias_sets``). A storage
    that fails is computed replicated and the graph rewritten again; each attempt forces at least
    one more storage, so at most one attempt per written storage follows the first.
    """
    facts = AliasFacts.of(gm) if facts is None else facts
    if _UNSAFE_NO_ALIAS_CHECK:
        facts = AliasFacts()
    preset = dict(ctx.place)
    forced = set(facts.unexplained)
    while True:
        ctx.reset(preset)
        ctx.facts, ctx.forced = (facts if facts else None), set(forced)
        try:
            out = _rewrite_once(gm, ctx, input_dims)
        except Refuted as err:
            new = err.orders - set(ctx.refuted)
            if not new:
                raise RuntimeError(f"seqpar: a token-local order was refuted twice ({err})") from err
            ctx.refuted.update(dict.fromkeys(new, str(err)))
            continue
        if not facts:
            break
        bad = check_local_aliasing(out, ctx.env, ctx.emitted, facts, forced, _local_inputs(gm, ctx, preset)) - forced
        if not bad:
            break
        forced |= bad
    _say_forced(ctx, facts, forced)
    _say_refuted(ctx, gm)
    if ctx.rank == 0:               # every rank of the group compiles the same graph: say it once
        for message in dict.fromkeys(ctx.messages):
            warnings.warn(message, stacklevel=2)
    return out


def _local_inputs(gm: fx.GraphModule, ctx: ShardingContext, preset: dict) -> list:
    """(shape, dtype, device) of each placeholder as this rank receives it: inputs that arrive
    sharded (a frame's SequenceShards, an entry activation) hold S/P of their sequence dim."""
    specs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        ex = ctx.example(node)
        if not isinstance(ex, torch.Tensor):
            specs.append(int(ex) if isinstance(ex, torch.SymInt) else ex)
            continue
        shape = [int(d) for d in ex.shape]
        pl = preset.get(node)
        if isinstance(pl, SeqRange):
            from .range_layout import local_count
            shape[pl.dim] = pl.pre * local_count(ctx, pl) * pl.post
        elif isinstance(pl, Shard):
            shape[pl.dim] //= ctx.P
        specs.append((tuple(shape), ex.dtype, ex.device))
    return specs


def _say_forced(ctx: ShardingContext, facts: AliasFacts, forced: set) -> None:
    """One message per storage computed replicated because a write into it could not be done
    on this rank's shard in place (an error under ``fallback="error"``)."""
    for key in forced:
        if not any(isinstance(ctx.placement_of(m), Shard) or _meets_shards(ctx, m) for m in facts.members.get(key, [])):
            continue             # nothing sharded would have touched it: no parallelism lost
        message = (f"seqpar: {facts.describe(key)} cannot be done on this rank's shard in place; the values that "
                   f"share its storage are computed replicated so the write reaches every one of them "
                   f"(correct, slower)")
        if ctx.fallback == "error":
            raise SeqparFallbackError(message.replace("(correct, slower)", "SEQPAR_FALLBACK=error forbids it"))
        ctx.messages.append(message)


def _say_refuted(ctx: ShardingContext, gm: fx.GraphModule) -> None:
    """Why a sort over each rank's own tokens (MoE routing) was taken the usual way instead."""
    names = {n.name: n for n in gm.graph.nodes}
    for name, why in ctx.refuted.items():
        if name in names:
            ctx.messages.append(f"seqpar: the sort at {_source_line(names[name])} cannot run on each rank's own "
                                f"tokens ({why}); it is computed on the gathered sequence (correct, slower)")


def _meets_shards(ctx: ShardingContext, node: fx.Node) -> bool:
    return any(_is_sharded(ctx.placement_of(a)) for a in node.all_input_nodes) or any(
        _is_sharded(ctx.placement_of(u)) for u in node.users)


_NEW_FACTORIES = {"new_empty", "new_zeros", "new_ones", "new_full", "new_tensor", "new_empty_strided"}


def _replicated(ctx: ShardingContext, node: fx.Node) -> fx.Node:
    """``node`` as the user wrote it, on full values (sharded operands gathered): how the
    members and writes of a forced storage are computed."""
    def full(a):
        return ctx.full(a)
    args = _map(full, node.args)
    if node.op == "call_method" and node.target in _NEW_FACTORIES and isinstance(node.args[0], fx.Node):
        args = (ctx.env[node.args[0]], *args[1:])          # only its dtype and device are read
    return ctx.emit(node.target, args, _map(full, node.kwargs), Replicate(), op=node.op)


def _rewrite_once(gm: fx.GraphModule, ctx: ShardingContext, input_dims: dict) -> fx.GraphModule:
    from .sharding_rules import SEEDING_RULES, rule_for, rule_key
    facts, forced = ctx.facts, ctx.forced
    region_mark = None                          # emitted nodes keep the user's checkpoint region
    for node in gm.graph.nodes:
        if region_mark is not None:
            copy_region_meta(*region_mark, ctx.graph)
        region_mark = (node, ctx.graph._root.prev)
        if node.op == "placeholder":
            new = ctx.emit(node.target, (), op="placeholder")
            new.meta.update(node.meta)
            ctx.env[node] = new
            forced_input = facts is not None and facts.in_sets(node, forced)
            if forced_input and isinstance(ctx.placement_of(node), Shard):
                raise SeqparFallbackError(
                    f"seqpar: {facts.describe(facts.key_of(node))} writes into a sequence-sharded input of this "
                    f"frame in a way that cannot be done on this rank's shard; seqpar refuses rather than write "
                    f"into a gathered copy. Compute it inside one compiled frame, or write out of place")
            if node.name in input_dims and not forced_input:
                ctx.seq_inputs[node] = input_dims[node.name]
            if node.name in ctx.data_inputs and not forced_input:
                ctx._from_data.add(node)
            continue
        if facts is not None and facts.in_sets(node, forced) and node.op in ("call_function", "call_method"):
            ctx.env[node], ctx.place[node] = _replicated(ctx, node), Replicate()
            continue
        writes = facts is not None and facts.key_of(node) is not None and is_write(node)
        before = ctx.graph._root.prev
        if applies(ctx, node):                 # MoE routing on each rank's own tokens (token_local.py)
            result = token_local_rule(ctx, node)
            if result is not None:
                ctx.env[node], ctx.place[node] = result
                if writes:
                    ctx.emitted[node] = _nodes_after(before, ctx.graph)
                continue
        if node.op == "get_attr":
            ctx.env[node] = ctx.emit(node.target, (), op="get_attr")
            continue
        if node.op == "output":
            check_exit(ctx, node.args[0])
            gathered = []

            def exit_value(old):
                pl = ctx.placement_of(old)
                if ctx.output == "local" or not isinstance(pl, Shard):
                    return ctx.env[old]
                gathered.append(old.name)
                return ctx.full(old)
            ctx.emit("output", (_map(exit_value, node.args[0]),), op="output")
            if gathered and ctx.rank == 0:
                cache = (" A returned KV cache is gathered layer by layer (use_cache=False avoids it)."
                         if len(gathered) > 1 else "")
                warnings.warn(f"seqpar: {len(gathered)} sharded output(s) gathered at this frame's exit "
                              f"({', '.join(gathered[:6])}{', ...' if len(gathered) > 6 else ''}): an all-gather "
                              f"each, and every rank holds the whole sequence of each (its size grows with the whole "
                              f"context, not with S/P).{cache} Return only what you need (the loss), or set "
                              f"SEQPAR_OUTPUT=local to keep outputs sharded", stacklevel=2)
            continue
        if rule_key(node) in SEEDING_RULES:
            for a in node.all_input_nodes:
                ctx.seed(a)
        inputs_sharded = any(_is_sharded(ctx.placement_of(a)) for a in node.all_input_nodes)
        if not inputs_sharded and not _creates_sequence(ctx, node):
            ctx.env[node] = ctx.emit(node.target, _map(lambda a: ctx.env[a], node.args),
                                     _map(lambda a: ctx.env[a], node.kwargs), Replicate(), op=node.op)
            ctx.place[node] = Replicate()
            if any(a in ctx._from_data for a in node.all_input_nodes):
                ctx._from_data.add(node)
            d = _derived_sequence_dim(ctx, node)
            if d is not None:                  # shardable where a rule first needs it, like the input itself
                ctx.seq_inputs[node] = d
            if writes:
                ctx.emitted[node] = _nodes_after(before, ctx.graph)
            continue
        sizes = ctx.example(node)
        if isinstance(sizes, (list, tuple)) and sizes and all(type(v) is int for v in sizes) or type(sizes) is int:
            # x.size() of a sharded value in a graph traced with a symbolic length: once
            # specialised to a length, the full value's sizes are numbers, the same on every rank
            ctx.env[node] = ctx.emit(_sizes_of_the_full_value, (tuple(sizes) if not isinstance(sizes, int) else sizes,),
                                     {}, Replicate())
            ctx.place[node] = Replicate()
            ctx.env[node].meta["seqpar_placement"] = Replicate()
            continue
        rule = rule_for(node)
        try:
            result = rule(ctx, node) if rule is not None else None
        except (ValueError, SeqparFallbackError):
            raise                      # the user's error (e.g. attention dropout), said clearly
        except Exception as err:       # noqa: BLE001 - a rule that cannot handle this use: fall back
            result = f"its rule failed ({type(err).__name__}: {err})"
        if isinstance(result, str) or result is None:
            sharded = [a for a in node.all_input_nodes if _is_sharded(ctx.placement_of(a))]
            if not all(a in ctx.seq_inputs for a in sharded):
                ctx.fall_back(node, result or "no sharding rule for this op")
            # else: every sharded input is a user input whose full value is at hand: no gather
            ctx.env[node] = ctx.emit(node.target, _map(ctx.full, node.args), _map(ctx.full, node.kwargs),
                                     Replicate(), op=node.op)
            ctx.place[node] = Replicate()
        else:
            ctx.env[node], ctx.place[node] = result
        ctx.env[node].meta["seqpar_placement"] = ctx.place[node]
        if writes:
            ctx.emitted[node] = _nodes_after(before, ctx.graph)
    for name, value in ctx.constants.items():
        gm.register_buffer(name, value, persistent=False)
    from .grad_buckets import bucket_grad_sums     # one all-reduce per bucket, not per tensor
    bucket_grad_sums(ctx.graph)
    out = fx.GraphModule(gm, ctx.graph)
    eliminate_dead_code(out.graph)
    out.graph.lint()
    out.recompile()
    # which new node holds each original node's value, and its placement: the parity check
    # (the verify option) compares them node by node to name the first one that differs
    alive = {n.name for n in out.graph.nodes}
    out.seqpar_node_map = {old.name: (new.name, ctx.place.get(old, Replicate()))
                           for old, new in ctx.env.items()
                           if isinstance(new, fx.Node) and new.name in alive}
    return out


def _sizes_of_the_full_value(sizes):
    """The global sizes a ``size()`` call reads (a graph node, so later nodes can take them)."""
    return torch.Size(sizes) if isinstance(sizes, tuple) else sizes


def _derived_sequence_dim(ctx: ShardingContext, node: fx.Node) -> int | None:
    """The sequence dim of a replicated value computed from a user input that carries the
    sequence (``input_ids.view(-1, S)`` in transformers' wrappers, positions from a cumsum of
    the attention mask), found as for the inputs themselves: dim 1 when it has length S, else
    the one dim of length S. Such a value is sharded where a rule first needs it, exactly as an
    input is (``seed``); without this a model whose wrapper views its ids ran replicated.

    A model whose input has no sequence dim (an image, DiT's patchify: ``conv(img).flatten(2)
    .transpose(1, 2)``) makes its sequence from it: an activation ``[B, S, ...]`` computed from
    the user's inputs is shardable the same way (the patchify runs replicated, then each rank
    takes its tokens where the first norm or linear needs them)."""
    ex = ctx.example(node)
    if not isinstance(ex, torch.Tensor) or (ctx.facts is not None and ctx.facts.key_of(node) is not None):
        return None
    if not any(a in ctx.seq_inputs for a in node.all_input_nodes):
        made = (node in ctx._from_data and ex.is_floating_point() and ex.dim() >= 3 and ex.shape[1] == ctx.S
                and tuple(ex.shape).count(ctx.S) == 1)
        return 1 if made else None
    shape = tuple(ex.shape)
    if len(shape) >= 2 and shape[1] == ctx.S and shape.count(ctx.S) == 1:
        return 1
    return shape.index(ctx.S) if shape.count(ctx.S) == 1 else None


def _nodes_after(mark: fx.Node, graph: fx.Graph) -> list[fx.Node]:
    found, node = [], mark.next
    while node is not graph._root:
        found.append(node)
        node = node.next
    return found


def _creates_sequence(ctx: ShardingContext, node: fx.Node) -> bool:
    """A replicated op that makes a full-sequence value from nothing (``arange(S)``): computed
    locally at its source instead (docs/architecture.md, "Compute locally at the source")."""
    from .sharding_rules import is_sequence_arange
    return is_sequence_arange(ctx, node)
