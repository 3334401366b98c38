"""Functions that run on every spawned rank for the ring attention tests (see ``spawn.py``).

Each builds the same full float64 tensors on every rank from a fixed seed, computes the
float64 reference on the full sequence, runs ``ring_attention`` on this rank's shard and returns
squared-error sums, so the test can report ||x - ref|| / ||ref|| over the whole tensor.
"""
from __future__ import annotations

import collections
import os
import time

import torch
import torch.nn.functional as F

import seqpar_compiler as sp
from reference import reference_attention
from seqpar_compiler.kernels import AttentionSpec
from seqpar_compiler.runtime import local_positions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _full_inputs(B, Hq, Hkv, S, D, docs, seed=1234, Dv=None):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, Dv, generator=g, dtype=torch.float64)
    dout = torch.randn(B, Hq, S, Dv, generator=g, dtype=torch.float64)
    doc = None
    if docs:
        # non-decreasing ids with a few boundaries per row, as packing makes them
        doc = torch.sort(torch.randint(0, 5, (B, S), generator=g), dim=1).values
    return q, k, v, dout, doc


def _sq(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return [float((x - ref).pow(2).sum()), float(ref.pow(2).sum()), bool(torch.isnan(x).any())]


def alibi_slopes(H):
    """The ALiBi paper's geometric slopes 2^(-8h/H), h = 1..H, made steeper so the bias of a
    key a few chunks away is large."""
    return torch.tensor([2 ** (-4 * (h + 1) / H) for h in range(H)], dtype=torch.float32)


def key_padding(B, S, left=5, right=7):
    """Key validity [B, S]: row 0 left-padded (its first queries see no key under a causal mask),
    row 1 right-padded, every later row a scattered pattern."""
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, :left] = False
    valid[1 % B, S - right:] = False
    for b in range(2, B):
        valid[b, torch.arange(S) % 3 == 1] = False
    return valid


def accuracy_case(rank, P, *, schedule, causal=False, Hq=4, Hkv=4, D=32, S_local=16, B=2, window=None,
                  docs=False, dtype="float32", overlap=True, kernel=None, alibi=False, softcap=None, Dv=None,
                  padding=False, band=None, table=False):
    S = S_local * P
    q64, k64, v64, dout64, doc = _full_inputs(B, Hq, Hkv, S, D, docs, Dv=Dv)
    slopes = alibi_slopes(Hq) if alibi else None
    valid = key_padding(B, S) if padding else None
    # a table over the offsets; "learned": it requires grad (T5's bias), its gradient summed over ranks
    rel = torch.randn(Hq, 2 * S - 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64) if table else None
    rel_ref = None if rel is None else rel.clone().requires_grad_(table == "learned")
    behind, ahead = band if band is not None else (None, None)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q64, k64, v64))
    ref_out, _ = reference_attention(qr, kr, vr, causal=causal, window=window, doc_ids=doc,
                                     alibi_slopes=slopes, softcap=softcap, k_valid=valid, behind=behind, ahead=ahead,
                                     rel_bias=rel_ref)
    ref_out.backward(dout64)
    idx = local_positions(schedule, rank, P, S)
    dt = DTYPES[dtype]
    q, k, v = (t[:, :, idx].to(dt).requires_grad_() for t in (q64, k64, v64))
    local_doc, local_valid = (None if x is None else x[:, idx] for x in (doc, valid))
    if rel is not None:
        rel = rel.float().requires_grad_(table == "learned")
    if band is not None:        # a bidirectional band has no public keyword: the op takes the spec itself
        spec = AttentionSpec(scale=D ** -0.5, behind=behind, ahead=ahead, docs=docs, key_padding=padding,
                             alibi=alibi, softcap=softcap, rel_bias=table)
        group_name = torch.distributed.group.WORLD.group_name if P > 1 else ""
        out, _ = torch.ops.seqpar.ring_attention(q, k, v, spec.encode(), schedule, group_name,
                                                 overlap, kernel or "auto", local_doc, local_valid, slopes, rel)
    else:
        out = sp.ring_attention(q, k, v, causal=causal, window=window, schedule=schedule, overlap=overlap,
                                kernel=kernel, doc_ids=local_doc, alibi_slopes=slopes, softcap=softcap,
                                key_padding=local_valid, rel_bias=rel)
    out.backward(dout64[:, :, idx].to(dt))
    res = {"out": _sq(out, ref_out[:, :, idx]), "dq": _sq(q.grad, qr.grad[:, :, idx]),
           "dk": _sq(k.grad, kr.grad[:, :, idx]), "dv": _sq(v.grad, vr.grad[:, :, idx])}
    if table == "learned":                       # replicated: every rank holds the whole gradient
        res["dtable"] = _sq(rel.grad, rel_ref.grad)
    if dtype != "float32" and rank == 0:
        # single-process SDPA in the same low precision against the same reference
        if window is not None or doc is not None:
            raise ValueError("low-precision baseline only for plain/causal cases")
        qs, ks, vs = (t.to(dt).requires_grad_() for t in (q64, k64, v64))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=Hq != Hkv)
        o.backward(dout64.to(dt))
        res["sdpa"] = {"out": _sq(o, ref_out), "dq": _sq(qs.grad, qr.grad), "dk": _sq(ks.grad, kr.grad),
                       "dv": _sq(vs.grad, vr.grad)}
    return res


def stats_case(rank, P, *, schedule, causal, Hq=4, Hkv=4, D=16, S_local=64, B=1, window=None, docs=False):
    S = S_local * P
    q64, k64, v64, _, doc = _full_inputs(B, Hq, Hkv, S, D, docs)
    idx = local_positions(schedule, rank, P, S)
    q, k, v = (t[:, :, idx].float() for t in (q64, k64, v64))
    with sp.stats() as s:
        sp.ring_attention(q, k, v, causal=causal, window=window, schedule=schedule,
                          doc_ids=None if doc is None else doc[:, idx])
    d = s.as_dict()
    d["kv_bytes"] = (k.numel() + v.numel()) * k.element_size()
    d["doc_bytes"] = 0 if doc is None else doc[:, idx].numel() * doc.element_size()
    return d


def run_cases(rank, P, cases):
    """Run named cases: ``[(name, kind, kwargs)]`` with kind ``accuracy``, ``stats`` or
    ``allocations``; also
    counts which block kernels ran (``kernel_calls``)."""
    import seqpar_compiler.runtime.ring as ring
    calls = collections.Counter({"aten": 0, "triton": 0, "math": 0})   # "auto-cuda" etc. on a GPU
    real_fwd = ring.block_attention_forward

    def counting(q, k, v, mask, scale, kernel):
        calls[kernel] += 1
        return real_fwd(q, k, v, mask, scale, kernel)
    ring.block_attention_forward = counting
    runners = {"accuracy": accuracy_case, "stats": stats_case, "allocations": allocation_case}
    try:
        out = {name: runners[kind](rank, P, **kw) for name, kind, kw in cases}
    finally:
        ring.block_attention_forward = real_fwd
    out["kernel_calls"] = dict(calls)
    return out


def disagreement_cases(rank, P):
    """Ranks that pass different configurations must all get a clear error."""
    errors = {}
    base = dict(B=1, H=2, S_local=8, D=8)
    variants = {
        "shape": lambda r: dict(S_local=8 if r == 0 else 16),
        "causal": lambda r: dict(causal=(r == 0)),
        "schedule": lambda r: dict(schedule="zigzag" if r == 0 else "striped"),
    }
    for name, var in variants.items():
        kw = dict(base, causal=False, schedule="zigzag")
        kw.update(var(rank))
        q = torch.randn(kw["B"], kw["H"], kw["S_local"], kw["D"])
        try:
            sp.ring_attention(q, q, q, causal=kw["causal"], schedule=kw["schedule"])
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    # the group still works afterwards
    q = torch.randn(1, 2, 8, 8)
    out = sp.ring_attention(q, q, q)
    errors["after"] = bool(torch.isfinite(out).all())
    return errors


def fault_case(rank, P, mode):
    """Rank 1 dies (``exit``) or raises (``raise``) at its first block kernel call: it has posted
    its first sends, but never forwards the blocks the others still need."""
    import seqpar_compiler.runtime.ring as ring
    calls = {"n": 0}
    real = ring.block_attention_forward

    def failing(*a, **kw):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 1:
            if mode == "exit":
                os._exit(3)
            raise RuntimeError("injected failure on rank 1")
        return real(*a, **kw)

    ring.block_attention_forward = failing
    q = torch.randn(1, 2, 64, 16)
    start = time.monotonic()
    try:
        sp.ring_attention(q, q, q, causal=False, schedule="ring")
        return {"error": None, "seconds": time.monotonic() - start}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - start}


def shard_gather_case(rank, P, schedule):
    """shard → gather round trip and the gradient convention of both."""
    S = 4 * P
    x = torch.arange(2 * S * 3, dtype=torch.float64).reshape(2, S, 3).requires_grad_()
    local = sp.shard_sequence(x, 1, schedule=schedule)
    expected_local = x.detach()[:, local_positions(schedule, rank, P, S)]
    w = torch.arange(local.numel(), dtype=torch.float64).reshape(local.shape) + 100 * rank
    (local * w).sum().backward()
    # every rank must hold the full gradient: rank r's weights at rank r's positions
    y = local.detach().clone().requires_grad_()
    full = sp.gather_sequence(y, 1, schedule=schedule)
    (full * torch.arange(full.numel(), dtype=torch.float64).reshape(full.shape)).sum().backward()
    return {"local_ok": torch.equal(local.detach(), expected_local),
            "roundtrip_ok": torch.equal(full.detach(), x.detach()),
            "x_grad": x.grad.tolist(),
            "w": w.tolist(),
            "y_grad_ok": torch.equal(y.grad, torch.arange(full.numel(), dtype=torch.float64)
                                     .reshape(full.shape)[:, local_positions(schedule, rank, P, S)])}


def subgroup_case(rank, P):
    """Two sequence groups of 2 on 4 ranks (as SEQPAR_DEGREE=2 makes them): each group runs its
    own ring on its own data, checked against the float64 reference of that data."""
    import torch.distributed as dist
    from seqpar_compiler.backend import sequence_group
    group = sequence_group(2)
    g_rank, seed = dist.get_rank(group), 1000 + rank // 2
    S = 32
    q64, k64, v64, dout64, _ = _full_inputs(1, 2, 2, S, 16, False, seed=seed)
    ref, _ = reference_attention(q64, k64, v64, causal=True)
    idx = local_positions("zigzag", g_rank, 2, S)
    out = sp.ring_attention(q64[:, :, idx].float(), k64[:, :, idx].float(), v64[:, :, idx].float(),
                            causal=True, schedule="zigzag", group=group)
    full = sp.gather_sequence(out, 2, schedule="zigzag", group=group)
    return float((full.double() - ref).norm() / ref.norm())


def allocation_case(rank, P, *, schedule, causal=True, Hq=4, Hkv=4, D=16, S_local=64, B=1):
    """Activation-sized buffers one forward and one backward of the ring loops allocate on this
    rank, for inputs laid out as a model's projections make them ([B, S, H, D] in memory)."""
    from allocation_probe import count_new_buffers
    from seqpar_compiler.runtime.comm import RingComm, in_wire_layout
    from seqpar_compiler.kernels import AttentionSpec
    from seqpar_compiler.runtime.ring import RingConfig, ring_backward, ring_forward
    import torch.distributed as dist
    S = S_local * P
    q64, k64, v64, dout64, _ = _full_inputs(B, Hq, Hkv, S, D, False)
    idx = local_positions(schedule, rank, P, S)
    q, k, v, dout = (t[:, :, idx].float().transpose(1, 2).contiguous().transpose(1, 2)
                     for t in (q64, k64, v64, dout64))
    cfg = RingConfig(schedule=schedule, spec=AttentionSpec.of(causal=causal, scale=D ** -0.5), kernel="aten",
                     overlap=True)
    comm = RingComm(dist.group.WORLD)
    (out, lse), fwd = count_new_buffers(lambda: ring_forward(q, k, v, None, cfg, comm), k.numel())
    grads, bwd = count_new_buffers(lambda: ring_backward(dout, q, k, v, out, lse, None, cfg, comm), k.numel())
    return {"forward": fwd, "backward": bwd,
            "wire_layout": [in_wire_layout(t) for t in (out, *grads)]}
