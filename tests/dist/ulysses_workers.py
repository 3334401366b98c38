"""Functions that run on every spawned rank for the all-to-all attention tests (issue 15).

As ``ring_workers``: the same full float64 tensors on every rank from a fixed seed, the float64
reference on the full sequence, ``ulysses_attention`` on this rank's shard (laid out by
``shard_sequence``'s layout for the schedule), squared-error sums back to the test.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import seqpar_compiler as sp
from reference import reference_attention
from ring_workers import DTYPES, _full_inputs, _sq, alibi_slopes, key_padding
from seqpar_compiler.runtime import local_positions


def _layout(schedule: str, u: int | None) -> str:
    return f"hybrid:{u}" if schedule == "hybrid" else schedule


def accuracy_case(rank, P, *, schedule, u=None, causal=False, Hq=4, Hkv=4, D=32, S_local=16, B=2, window=None,
                  docs=False, dtype="float32", kernel=None, alibi=False, softcap=None, Dv=None, padding=False,
                  learned_table=False):
    S = S_local * P
    q64, k64, v64, dout64, doc = _full_inputs(B, Hq, Hkv, S, D, docs, Dv=Dv)
    slopes = alibi_slopes(Hq) if alibi else None
    valid = key_padding(B, S) if padding else None
    # a learned relative-position table: every rank's heads' rows of its gradient, summed
    table = torch.randn(Hq, 2 * S - 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64) \
        if learned_table else None
    table_ref = None if table is None else table.clone().requires_grad_()
    qr, kr, vr = (t.clone().requires_grad_() for t in (q64, k64, v64))
    ref_out, _ = reference_attention(qr, kr, vr, causal=causal, window=window, doc_ids=doc,
                                     alibi_slopes=slopes, softcap=softcap, k_valid=valid, rel_bias=table_ref)
    ref_out.backward(dout64)
    idx = local_positions(_layout(schedule, u), rank, P, S)
    # the public shard function lays tensors out the same way
    assert torch.equal(sp.shard_sequence(q64, 2, schedule=schedule, ulysses_degree=u), q64[:, :, idx])
    dt = DTYPES[dtype]
    q, k, v = (t[:, :, idx].to(dt).requires_grad_() for t in (q64, k64, v64))
    rel = None if table is None else table.float().requires_grad_()
    out = sp.ulysses_attention(q, k, v, causal=causal, window=window, schedule=schedule, ulysses_degree=u,
                               kernel=kernel, doc_ids=None if doc is None else doc[:, idx],
                               alibi_slopes=slopes, softcap=softcap,
                               key_padding=None if valid is None else valid[:, idx],
                               rel_bias=rel)
    out.backward(dout64[:, :, idx].to(dt))
    res = {"out": _sq(out, ref_out[:, :, idx]), "dq": _sq(q.grad, qr.grad[:, :, idx]),
           "dk": _sq(k.grad, kr.grad[:, :, idx]), "dv": _sq(v.grad, vr.grad[:, :, idx])}
    if rel is not None:
        res["dtable"] = _sq(rel.grad, table_ref.grad)
    gathered = sp.gather_sequence(out.detach(), 2, schedule=schedule, ulysses_degree=u)
    res["gather_roundtrip"] = bool(torch.equal(gathered[:, :, idx], out.detach()))
    if dtype != "float32" and rank == 0:
        qs, ks, vs = (t.to(dt).requires_grad_() for t in (q64, k64, v64))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=Hq != Hkv)
        o.backward(dout64.to(dt))
        res["sdpa"] = {"out": _sq(o, ref_out), "dq": _sq(qs.grad, qr.grad), "dk": _sq(ks.grad, kr.grad),
                       "dv": _sq(vs.grad, vr.grad)}
    return res


def stats_case(rank, P, *, schedule, u=None, causal=True, Hq=4, Hkv=4, D=16, S_local=64, B=1, docs=False):
    S = S_local * P
    q64, k64, v64, dout64, doc = _full_inputs(B, Hq, Hkv, S, D, docs)
    idx = local_positions(_layout(schedule, u), rank, P, S)
    q, k, v = (t[:, :, idx].float().requires_grad_() for t in (q64, k64, v64))
    with sp.stats() as s:
        out = sp.ulysses_attention(q, k, v, causal=causal, schedule=schedule, ulysses_degree=u,
                                   doc_ids=None if doc is None else doc[:, idx])
    d = {"forward": s.as_dict()}
    with sp.stats() as s:
        out.backward(dout64[:, :, idx].float())
    d["backward"] = s.as_dict()
    d["q_bytes"], d["kv_bytes"] = q.numel() * 4, (k.numel() + v.numel()) * 4
    return d


def staging_case(rank, P, *, schedule, u=None, causal=True, docs=True, Hq=8, Hkv=2, D=16, S_local=16, B=2):
    """The same forward + backward with every transfer (all-to-all, document all-gather, ring)
    forced through host buffers, and direct: the results must be bitwise equal, and staging
    must have carried the traffic (under gloo with CUDA tensors it is the only path)."""
    from seqpar_compiler.runtime.comm import set_host_staging
    S = S_local * P
    q64, k64, v64, dout64, doc = _full_inputs(B, Hq, Hkv, S, D, docs)
    idx = local_positions(_layout(schedule, u), rank, P, S)
    res = {}
    for staged in (True, False):
        q, k, v = (t[:, :, idx].float().requires_grad_() for t in (q64, k64, v64))
        set_host_staging(staged)
        try:
            with sp.stats() as s:
                out = sp.ulysses_attention(q, k, v, causal=causal, schedule=schedule, ulysses_degree=u,
                                           doc_ids=None if doc is None else doc[:, idx])
                out.backward(dout64[:, :, idx].float())
        finally:
            set_host_staging(None)
        res["staged" if staged else "direct"] = {
            "tensors": [out.detach(), q.grad, k.grad, v.grad], "host_staged_bytes": s.host_staged_bytes,
            "a2a_bytes": s.a2a_bytes_sent + s.a2a_bytes_received, "ring_bytes": s.bytes_sent + s.bytes_received}
    return res


def error_case(rank, P, *, schedule, u=None, Hq=4, Hkv=4, S_local=8):
    """The message of the error a bad configuration raises (None if none)."""
    q = torch.randn(1, Hq, S_local, 8)
    k = torch.randn(1, Hkv, S_local, 8)
    try:
        sp.ulysses_attention(q, k, k, schedule=schedule, ulysses_degree=u)
    except ValueError as err:
        return str(err)
    return None


def run_cases(rank, P, cases):
    runners = {"accuracy": accuracy_case, "stats": stats_case, "error": error_case, "staging": staging_case}
    return {name: runners[kind](rank, P, **kw) for name, kind, kw in cases}
