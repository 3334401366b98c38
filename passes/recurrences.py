"""Linear recurrences over the sequence written as chunked scans (Mamba-2's SSD, chunked gated
linear attention): recognised, proved, and collapsed into one node the rewrite runs across ranks
by passing the boundary state (``runtime/recurrence_op.py``).

Reads ``node.meta["example_value"]`` (global shapes) of the Dynamo graph; rewrites the graph in
place: each proved *chunk zone* becomes one call ``carried_recurrence(key, *inputs)`` whose
rule (``recurrence_rule``, in ``sharding_rules.RULES``) emits ``seqpar::carried_recurrence`` on
this rank's tokens. A zone that is found but not proved is left as it is (the rewrite gathers
the sequence there, warned) and a warning says why.

What a chunk zone is, from how the graph is built (never from names):
  * it starts where sequence values are viewed as chunks (``[.., S, ..] -> [.., S/c, c, ..]``)
    and ends where one is viewed back (``[.., S/c, c, ..] -> [.., S, ..]``); everything between
    depends on the sequence only through whole chunks;
  * it holds one *carried state*: a zero-filled tensor (the recurrence's initial state) put in
    front of the per-chunk states along the chunk dim (``cat([zeros, states], d)``); the state
    after the last chunk is the entry the zone drops from that dim (``x[:, :-1]``);
  * every op between the carried state and the zone's results is affine in it (it is added,
    concatenated, viewed, or multiplied by values that do not depend on it): ``out = A·h + B``.

The proof by evaluation, on random inputs at the global shapes: the zone run on P contiguous
parts chained through the carried state equals the zone run whole (so the zone made local, with
the chunk count of a part, computes the same recurrence), and its results and final state at
the midpoint of two states are the midpoints of its results at each (affine). Only then is it
collapsed.

Shape legend: S global sequence length, P ranks, c chunk length, n = S/c chunks (n/P per rank).
"""
from __future__ import annotations

import hashlib
import operator
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from seqpar_compiler.runtime.recurrence_op import RecurrenceBody, register_body, run_chain

carried_recurrence_op = torch.ops.seqpar.carried_recurrence.default    # an FX target (a CustomOpDef is not)

from .placement import Shard

__all__ = ["recurrence_length", "collapse_recurrences", "carried_recurrence", "recurrence_rule"]

_VIEWS = {"reshape", "view", torch.reshape}
_ZERO_SEEDS = {torch.zeros_like, "new_zeros", torch.zeros}
_CAT = {torch.cat, torch.concat, torch.concatenate}
# ops that are affine in one argument whatever it is (views, sums, casts), and ops that are
# affine in the carried state when only one factor depends on it
_STRUCTURAL = {operator.getitem, "permute", "transpose", torch.permute, torch.transpose, "reshape", "view",
               torch.reshape, "contiguous", "clone", "to", "float", "double", "unsqueeze", "squeeze", "expand",
               "sum", torch.sum, operator.neg, torch.neg, "neg", torch.unsqueeze, torch.squeeze, "flatten",
               torch.flatten, "unflatten", torch.cumsum, "cumsum"}
_ADDITIVE = {operator.add, operator.sub, torch.add, torch.sub, "add", "sub", "__add__", "__sub__"}
_PRODUCTS = {operator.mul, torch.mul, "mul", torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm",
             torch.einsum, operator.truediv, torch.div, "div"}
_SIZE_FACTORIES = {torch.ones, torch.zeros, torch.empty, torch.full, torch.arange, torch.eye}


def _ex(node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _shape(node) -> tuple | None:
    ex = _ex(node)
    return tuple(ex.shape) if isinstance(ex, torch.Tensor) else None


def _split(node: fx.Node, S: int) -> tuple[int, int] | None:
    """(sequence dim, chunk length c) if ``node`` views a sequence value as (S/c, c) chunks."""
    if node.target not in _VIEWS or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src, dst = _shape(node.args[0]), _shape(node)
    if src is None or dst is None or len(dst) != len(src) + 1 or src.count(S) != 1:
        return None              # a value with two dims of length S: which one is the sequence is unknown
    for d in range(len(src)):
        if src[d] == S and dst[:d] == src[:d] and dst[d + 2:] == src[d + 1:] and dst[d] * dst[d + 1] == S \
                and 1 < dst[d] < S:
            return d, dst[d + 1]
    return None


def _merge(node: fx.Node, S: int) -> int | None:
    """The sequence dim of the result if ``node`` views (S/c, c) chunks back as a sequence."""
    if node.target not in _VIEWS or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src, dst = _shape(node.args[0]), _shape(node)
    if src is None or dst is None or len(src) != len(dst) + 1:
        return None
    for d in range(len(dst)):
        if dst[d] == S and src[:d] == dst[:d] and src[d + 2:] == dst[d + 1:] and src[d] * src[d + 1] == S \
                and 1 < src[d] < S:
            return d
    return None


@dataclass
class _Zone:
    splits: list
    nodes: list             # in graph order, the merge last
    merge: fx.Node
    out_dim: int
    inputs: list            # external nodes, in order
    seq_dims: list          # per input: its sequence dim, or None for a value without one
    seed: fx.Node
    chunk: int


def _closure(split: fx.Node, S: int) -> tuple[set, list]:
    """The nodes reached from ``split`` up to the views back to the sequence (included)."""
    members, merges, frontier = set(), [], [split]
    while frontier:
        n = frontier.pop()
        if n in members:
            continue
        members.add(n)
        if n is not split and _merge(n, S) is not None:
            merges.append(n)
            continue
        frontier.extend(n.users)
    return members, merges


def _zones(gm: fx.GraphModule, S: int) -> list[_Zone | str]:
    """Chunk zones: the closures of chunk views that meet, merged."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups: list[tuple[set, set, list, int]] = []          # (members, merges, splits, chunk)
    for n in gm.graph.nodes:
        found = _split(n, S)
        if found is None or any(n in g[0] for g in groups):
            continue
        members, merges = _closure(n, S)
        touching = [g for g in groups if g[0] & members]
        for g in touching:
            groups.remove(g)
            members |= g[0]
            merges = list(dict.fromkeys([*g[1], *merges]))
        splits = [s for g in touching for s in g[2]] + [n]
        chunks = {found[1], *(g[3] for g in touching)}
        groups.append((members, merges, splits, chunks.pop() if len(chunks) == 1 else None))
    return [_make_zone(members, merges, chunk, S, order, splits) for members, merges, splits, chunk in groups]


def _constant_ancestors(members: set) -> set:
    """Inputs of the zone computed from nothing (``torch.ones(n, n)`` for a causal mask): they
    belong to it, at its local sizes."""
    pulled, frontier = set(), [a for m in members for a in m.all_input_nodes if a not in members]
    while frontier:
        a = frontier.pop()
        if a in pulled:
            continue
        ancestors, stack, ok = set(), [a], True
        while stack:
            x = stack.pop()
            if x.op not in ("call_function", "call_method"):
                ok = False
                break
            ancestors.add(x)
            stack.extend(x.all_input_nodes)
        if ok:
            pulled |= ancestors
    return pulled


def _make_zone(members, merges, chunk, S, order, splits) -> _Zone | str | None:
    if not any(n.target in _ZERO_SEEDS and any(u.target in _CAT for u in n.users) for n in members):
        return None              # chunks with no state carried across them: not a recurrence
    if chunk is None:
        return "sequence values viewed as chunks of different lengths"
    if len(merges) != 1:
        return f"{len(merges)} results leave the chunked zone (one is taken)"
    merge = merges[0]
    for n in members:
        if n is not merge and any(u not in members for u in n.users):
            return f"a per-chunk value ({n.name}) is used outside the chunked zone"
    members = set(members) | _constant_ancestors(members)
    seeds = [n for n in members if n.target in _ZERO_SEEDS and any(u.target in _CAT for u in n.users)]
    if len(seeds) != 1:
        return f"{len(seeds)} zero initial states concatenated in front of chunk states (one is needed)"
    nodes = sorted(members, key=order.__getitem__)
    inputs = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in members and a not in inputs:
                inputs.append(a)
    seq_dims = []
    for a in inputs:
        shape = _shape(a)
        if shape is None or not _ex(a).is_floating_point():
            return f"an input of the zone that is not a floating tensor ({a.name})"
        split = next((_split(s, S)[0] for s in splits if s.args[0] is a), None)
        if split is None and shape.count(S) > 1:
            return f"an input of the zone with two dims of length S ({a.name})"
        seq_dims.append(split if split is not None else shape.index(S) if S in shape else None)
    return _Zone(splits, nodes, merge, _merge(merge, S), inputs, seq_dims, seeds[0], chunk)


# -- structure: the carried state enters affinely --------------------------------------------------
def _affine_in_state(zone: _Zone) -> str | None:
    """None when every use of a value depending on the carried state is affine in it; else why not."""
    dep = {zone.seed}
    for n in zone.nodes:
        if n is zone.seed:
            continue
        used = [a for a in n.all_input_nodes if a in dep]
        if not used:
            continue
        dep.add(n)
        t = n.target
        if t in _CAT or t in _STRUCTURAL or t in _ADDITIVE:
            continue
        if t in _PRODUCTS:
            uses = []
            fx.node.map_arg((n.args, n.kwargs), uses.append)
            if sum(1 for a in uses if a in dep) == 1 and (t not in (operator.truediv, torch.div, "div")
                                                        or n.args[0] in dep):
                continue
            return f"the carried state is multiplied by itself or divides at {n.name}"
        return f"the carried state meets {getattr(t, '__name__', t)} at {n.name}, which is not affine in it"
    return None


def _final_state(zone: _Zone) -> tuple[fx.Node, int] | str:
    """(value, dim): the zone's state after its last chunk is ``value``'s last entry along
    ``dim`` — the entry the zone drops after putting the initial state in front."""
    cat = next(u for u in zone.seed.users if u.target in _CAT)
    parts = cat.args[0]
    d = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
    if parts[0] is not zone.seed or len(parts) != 2:
        return "the initial state is not put in front of the chunk states"
    length = _shape(cat)[d]
    for n in zone.nodes:
        if n.target is operator.getitem and isinstance(n.args[1], tuple) and len(n.args[1]) > d:
            idx = n.args[1]
            s = idx[d]
            src = _shape(n.args[0])
            if (isinstance(s, slice) and s.start in (None, 0) and s.step in (None, 1)
                    and s.stop in (-1, length - 1) and src is not None and src[d] == length
                    and all(i == slice(None) for i in idx[:d])):
                return n.args[0], d
    return "no chunk state is dropped after the last chunk"


# -- the zone as functions: whole and on one rank's part ----------------------------------------
def _localise(node: fx.Node, args: tuple, n_chunks: int, P: int, S: int, chunk: int, keep_chunk: bool) -> tuple:
    """The arguments of ``node`` at one rank's part: sizes that count chunks (n or n+1, the
    chunks with the initial state in front) or tokens become the part's; ``expand`` keeps the
    sizes of dims that are not broadcast (-1). With ``keep_chunk``, a factory's size equal to
    the chunk length stays (a mask inside a chunk when n = c, S = c², e.g. 65536 = 256²). The
    chained evaluation checks the result."""
    sizes = {n_chunks: n_chunks // P, n_chunks + 1: n_chunks // P + 1, S: S // P}

    def swap(v):
        return sizes.get(v, v) if isinstance(v, int) and not isinstance(v, bool) else v
    t = node.target
    if t == "expand":
        src = _shape(node.args[0])
        dims = list(args[1:]) if not (len(args) == 2 and isinstance(args[1], (list, tuple))) else list(args[1])
        lead = len(dims) - len(src)
        new = [(-1 if i >= lead and src[i - lead] != 1 else swap(v)) for i, v in enumerate(dims)]
        return (args[0], *new)
    if t in _VIEWS:
        rest = args[1:]
        listed = len(rest) == 1 and isinstance(rest[0], (list, tuple))
        dims = list(rest[0]) if listed else list(rest)
        if -1 not in dims:               # a -1 takes the part's size by itself
            dims = [swap(v) for v in dims]
        return (args[0], dims) if listed else (args[0], *dims)
    if t in _SIZE_FACTORIES or t in ("new_zeros", "new_ones", "new_empty", "new_full"):
        if keep_chunk:
            sizes.pop(chunk, None)

        def deep(v):
            return type(v)(swap(x) for x in v) if isinstance(v, (list, tuple)) else swap(v)
        return tuple(deep(v) for v in args)
    return args


def _body_module(zone: _Zone, final: tuple, *, local: tuple | None, keep_chunk: bool = False) -> fx.GraphModule:
    """``fn(*inputs, h0) -> (out, hT)``; ``local = (n, P, S)`` makes the sizes one rank's."""
    g = fx.Graph()
    env = {a: g.placeholder(f"in_{i}") for i, a in enumerate(zone.inputs)}
    h0 = g.placeholder("h0")
    env[zone.seed] = h0
    for n in zone.nodes:
        if n is zone.seed:
            continue
        new = g.node_copy(n, lambda a: env[a])
        if local is not None:
            new.args = _localise(n, new.args, *local, zone.chunk, keep_chunk)
        env[n] = new
    value, d = final
    idx = tuple([slice(None)] * d + [slice(-1, None)])
    hT = g.call_function(operator.getitem, (env[value], idx))
    g.output((env[zone.merge], hT))
    gm = fx.GraphModule(torch.nn.Module(), g)
    return gm


def _random_inputs(zone: _Zone, gen: torch.Generator) -> list[torch.Tensor]:
    # in (-1/2, 0): decays stay decays (exp of a negative sum), products stay small
    return [(-0.5 * torch.rand(_shape(a), generator=gen, dtype=torch.float64)).to(_ex(a).device, _ex(a).dtype)
            for a in zone.inputs]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _prove(zone: _Zone, whole, part, P: int, S: int, seed_shape, seed_dtype, device) -> str | None:
    """None when chaining the part's function over P parts equals the whole, and it is affine in
    the carried state; else why not."""
    gen = torch.Generator().manual_seed(0)
    xs = _random_inputs(zone, gen)
    tol = 1e-9 if seed_dtype == torch.float64 else 1e-4
    with torch.no_grad():
        zero = torch.zeros(seed_shape, dtype=seed_dtype, device=device)
        try:
            ref, ref_T = whole(*xs, zero)
            parts = [[x if d is None else x.chunk(P, d)[r] for x, d in zip(xs, zone.seq_dims)] for r in range(P)]
            outs, hT = run_chain(part, parts, zero)
        except Exception as err:  # noqa: BLE001 - sizes that did not localise: not proved
            return f"the zone does not run on one rank's part ({type(err).__name__}: {err})"
        err = max(_rel(torch.cat(outs, zone.out_dim), ref), _rel(hT, ref_T))
        if not err < tol:
            return f"chaining the zone over {P} parts differs from the whole (relative error {err:.2e})"
        h1 = torch.randn(seed_shape, generator=gen, dtype=torch.float64).to(device, seed_dtype)
        h2 = torch.randn(seed_shape, generator=gen, dtype=torch.float64).to(device, seed_dtype)
        (a, aT), (b, bT), (m, mT) = (part(*parts[0], h) for h in (h1, h2, (h1 + h2) / 2))
        err = max(_rel(m, (a + b) / 2), _rel(mT, (aT + bT) / 2))
        if not err < tol:
            return f"the zone is not affine in its carried state (relative error {err:.2e})"
    return None


# -- the collapsed node and its rule ---------------------------------------------------------------
@dataclass(frozen=True)
class _Proved:
    whole: str          # body key at the global length (the replicated fallback)
    local: str          # body key at one rank's part
    seq_dims: tuple
    out_dim: int
    P: int


_PROVED: dict[str, _Proved] = {}


def carried_recurrence(key: str, *inputs):
    """The zone as the model computes it (all chunks, zero initial state): what runs where the
    rewrite cannot shard it."""
    from seqpar_compiler.runtime.recurrence_op import body_of
    body = body_of(_PROVED[key].whole)
    h0 = torch.zeros(body.state_shape, dtype=body.state_dtype, device=inputs[0].device)
    return body.fn(*inputs, h0)[0]


def recurrence_length(gm: fx.GraphModule, candidates) -> int | None:
    """The sequence length of a frame with no attention (a pure state-space model: Mamba-2), read
    off its chunked scans: the first candidate length (the user inputs' dim 1) at which a chunk
    zone is found. None when none is, or when finding one fails (the frame then runs replicated,
    warned, as before)."""
    for S in dict.fromkeys(candidates):
        try:
            if any(isinstance(z, _Zone) for z in _zones(gm, S)):
                return S
        except Exception:  # noqa: BLE001 - an unusual graph is simply not a recurrence of this length
            continue
    return None


def collapse_recurrences(gm: fx.GraphModule, S: int, P: int, rank: int = 0) -> list[str]:
    """Collapse every proved chunk zone of ``gm`` (module docstring); returns the keys. A zone
    found but not proved is left alone and said (rank 0)."""
    keys = []
    for zone in _zones(gm, S):
        if zone is None:
            continue
        if isinstance(zone, str):
            _say(rank, f"a chunked scan is left as written: {zone}")
            continue
        why = _affine_in_state(zone)
        final = _final_state(zone) if why is None else why
        if isinstance(final, str):
            _say(rank, f"the chunked scan ending at {_where(zone.merge)} is not a carried linear recurrence "
                       f"({final})")
            continue
        n_chunks = S // zone.chunk
        if n_chunks % P:
            _say(rank, f"the chunked scan ending at {_where(zone.merge)} has {n_chunks} chunks, not a multiple of "
                       f"the {P} ranks")
            continue
        whole = _body_module(zone, final, local=None)
        part = _body_module(zone, final, local=(n_chunks, P, S))
        seed = _ex(zone.seed)
        why = _prove(zone, whole, part, P, S, tuple(seed.shape), seed.dtype, seed.device)
        if why is not None and zone.chunk in (n_chunks, n_chunks + 1):     # a chunk mask's size read as a count
            part = _body_module(zone, final, local=(n_chunks, P, S), keep_chunk=True)
            why = _prove(zone, whole, part, P, S, tuple(seed.shape), seed.dtype, seed.device)
        if why is not None:
            _say(rank, f"the chunked scan ending at {_where(zone.merge)} is not proved to be a carried linear "
                       f"recurrence ({why})")
            continue
        keys.append(_collapse(gm, zone, whole, part, P, tuple(seed.shape), seed.dtype))
    if keys:
        gm.graph.lint()
        gm.recompile()
    return keys


def _collapse(gm, zone: _Zone, whole, part, P, seed_shape, seed_dtype) -> str:
    digest = hashlib.sha1((whole.code + part.code + str(seed_shape)).encode()).hexdigest()[:12]
    key = f"recurrence_{digest}"
    register_body(key + "_whole", RecurrenceBody(whole, seed_shape, seed_dtype))
    register_body(key + f"_part{P}", RecurrenceBody(part, seed_shape, seed_dtype))
    _PROVED[key] = _Proved(key + "_whole", key + f"_part{P}", tuple(zone.seq_dims), zone.out_dim, P)
    with gm.graph.inserting_before(zone.merge):
        call = gm.graph.call_function(carried_recurrence, (key, *zone.inputs))
    call.meta.update(zone.merge.meta)
    zone.merge.replace_all_uses_with(call)
    for n in reversed(zone.nodes):
        if not n.users:
            gm.graph.erase_node(n)
    return key


def recurrence_rule(ctx, node: fx.Node):
    """The collapsed zone on this rank's tokens: ``seqpar::carried_recurrence`` with sequence
    inputs as this rank's shards (contiguous layouts only: the state passes in sequence order
    from rank to rank) and other inputs whole (their gradient summed over the group)."""
    key, *inputs = node.args
    proved = _PROVED[key]
    from seqpar_compiler.runtime.sharding.layout import layout_of
    if not layout_of(ctx.schedule).contiguous:
        return (f"a linear recurrence passes its state from rank to rank in sequence order; layout "
                f"{ctx.schedule} is not contiguous (use schedule 'ring')")
    if ctx.P != proved.P:
        return f"the recurrence was proved for {proved.P} ranks, not {ctx.P}"
    args = []
    for a, d in zip(inputs, proved.seq_dims):
        pl = ctx.shard_of(a)
        if d is None:
            if pl is not None:
                return f"an input without the sequence ({a.name}) is sharded"
            args.append(ctx.weight(a))
            continue
        if pl is not None and (pl.dim != d or not pl.plain):
            return f"input {a.name} is sharded as {pl}, not along its sequence dim {d}"
        args.append(ctx.local(a, d))
    call = ctx.emit(carried_recurrence_op, (args, proved.local, ctx.group_name))
    ctx.collectives.append(f"state passing {node.name}")
    out = Shard(proved.out_dim)
    return ctx.emit(operator.getitem, (call, 0), placement=out), out


def _where(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
    return lines[-1] if lines else f"graph node {node.name}"


def _say(rank: int, message: str) -> None:
    if rank == 0:
        warnings.warn(f"seqpar: {message}; the sequence is gathered there (correct, slower)", stacklevel=3)
