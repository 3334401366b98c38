"""The recurrence pass on chunked scans captured from Dynamo, in one process: what it collapses
(a proved carried linear recurrence), what it leaves alone with a warning (a state used
non-affinely, no final state, sizes it cannot make local), and that the collapsed graph
computes what the model computes. The chained-over-ranks runs are in
``tests/models/test_hybrid_models.py``.
"""
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))

from fla_modules import chunk_simple_gla  # noqa: E402
from seqpar_compiler.passes.recurrences import carried_recurrence, collapse_recurrences  # noqa: E402
from seqpar_compiler.runtime.recurrence_op import body_of, run_chain  # noqa: E402


def _inputs(T, H=2, K=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, T, K, generator=g, dtype=torch.float64) for _ in range(3))
    gate = F.logsigmoid(torch.randn(1, H, T, generator=g, dtype=torch.float64)) / 4
    return q, k, v, gate


def _squared_state(q, k, v, g):
    """The chunk form with the carried state multiplied by itself: not a linear recurrence."""
    B, H, T, K = q.shape
    n, C = T // 16, 16
    k, v = k.reshape(B, H, n, C, K), v.reshape(B, H, n, C, K)
    kv = k.transpose(-1, -2) @ v
    states = torch.cat([kv.new_zeros(B, H, 1, K, K), kv], dim=2)
    new = states.cumsum(2)
    S = new[:, :, :-1] * new[:, :, :-1]
    return (q.reshape(B, H, n, C, K) @ S).reshape(B, H, T, K)


def _capture(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm
    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return graphs[0]


def _graph_args(gm, args, names="qkvg"):
    """``args`` in the order of the graph's placeholders (Dynamo orders them by first use)."""
    by_name = dict(zip(names, args))
    return [by_name[n.name[2]] for n in gm.graph.nodes if n.op == "placeholder"]


def _collapse(gm, S, P):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = collapse_recurrences(gm, S, P)
    return keys, [str(w.message) for w in caught]


def _gla(q, k, v, g):
    return chunk_simple_gla(q, k, v, g, 16, 0.5)


def test_fla_chunk_form_is_collapsed_and_still_computes_the_model():
    args = _inputs(96)
    gm = _capture(_gla, *args)
    keys, said = _collapse(gm, 96, 2)
    assert len(keys) == 1 and said == [], said
    assert sum(n.target is carried_recurrence for n in gm.graph.nodes) == 1
    out = gm(*_graph_args(gm, args))
    out = out[0] if isinstance(out, (tuple, list)) else out
    ref = _gla(*args)
    assert float((out - ref).norm() / ref.norm()) < 1e-13


def test_the_proved_part_chained_over_ranks_is_the_whole_sequence_recurrence():
    """The body the op runs on one rank, chained by hand over 3 parts, against the model."""
    args = _inputs(96, seed=3)
    gm = _capture(_gla, *args)
    keys, _ = _collapse(gm, 96, 3)
    call = next(n for n in gm.graph.nodes if n.target is carried_recurrence)
    from seqpar_compiler.passes.recurrences import _PROVED
    part = body_of(_PROVED[keys[0]].local)
    # the zone's inputs, computed by the graph up to the call
    env = {}
    for node, a in zip([n for n in gm.graph.nodes if n.op == "placeholder"], _graph_args(gm, args)):
        env[node] = a
    for node in gm.graph.nodes:
        if node is call:
            break
        if node.op in ("call_function", "call_method"):
            fa = torch.fx.node.map_arg(node.args, env.__getitem__)
            fk = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
            env[node] = (node.target(*fa, **fk) if node.op == "call_function"
                         else getattr(fa[0], node.target)(*fa[1:], **fk))
    xs = [env[a] for a in call.args[1:]]
    parts = [[x.chunk(3, d)[r] for x, d in zip(xs, _PROVED[keys[0]].seq_dims)] for r in range(3)]
    outs, _ = run_chain(part.fn, parts, torch.zeros(part.state_shape, dtype=part.state_dtype))
    chained = torch.cat(outs, _PROVED[keys[0]].out_dim)
    whole = body_of(_PROVED[keys[0]].whole)
    ref = whole.fn(*xs, torch.zeros(whole.state_shape, dtype=whole.state_dtype))[0]
    assert float((chained - ref).norm() / ref.norm()) < 1e-13


def test_a_state_multiplied_by_itself_is_left_alone_and_said():
    args = _inputs(64)
    gm = _capture(_squared_state, *args)
    keys, said = _collapse(gm, 64, 2)
    assert keys == [] and len(said) == 1 and "multiplied by itself" in said[0], said


def _explicit_views(q, k, v, g):
    """The chunk form with every chunk view's sizes written out (no -1)."""
    B, H, T, K = q.shape
    n, C = T // 16, 16
    q, k, v = (x.reshape(B, H, n, C, K) for x in (q, k, v))
    kv = k.transpose(-1, -2) @ v
    states = torch.cat([kv.new_zeros(B, H, 1, K, K), kv], dim=2)
    new = states.cumsum(2)
    return (q @ new[:, :, :-1]).reshape(B, H, T, K)


def test_sizes_that_cannot_be_made_local_are_refused_by_the_proof_not_trusted():
    """4 chunks and 4 heads in a view with its sizes written out: the chunk count cannot be told
    from the head count, the part's function is wrong or fails, and the proof says so."""
    args = _inputs(64, H=4)
    gm = _capture(_explicit_views, *args)
    keys, said = _collapse(gm, 64, 2)
    assert keys == [] and len(said) == 1 and "not proved" in said[0], said


def test_as_many_chunks_as_tokens_per_chunk_still_localises():
    """S = c² (64 = 8·8): the chunk mask ``ones(c, c)`` has the size of the chunk count; the
    pass retries with the chunk-sized masks kept and proves that."""
    def gla8(q, k, v, g):
        return chunk_simple_gla(q, k, v, g, 8, 0.5)
    args = _inputs(64, K=16)
    gm = _capture(gla8, *args)
    keys, said = _collapse(gm, 64, 2)
    assert len(keys) == 1 and said == [], said
