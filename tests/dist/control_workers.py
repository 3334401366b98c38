"""Functions that run on every spawned rank for the control-collective and host-staging tests.

One gloo spawn serves every case: a ``cuda:gloo`` group made with ``new_group`` serves only
CUDA tensors, as NCCL does, so on a CPU machine it reproduces what every NCCL user hit at the
first call ("No backend type associated with device type cpu", issue 14).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import seqpar_compiler as sp
from reference import reference_attention
from seqpar_compiler.runtime import local_positions

NO_CPU_BACKEND = "No backend type associated with device type cpu"


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the message is the result
        return f"{type(err).__name__}: {err}"
    return None


def control_sites_on_cuda_only_group(rank, P):
    """Each control collective of seqpar on a group that serves no CPU tensors: the message each
    raises (with no CUDA here, the one saying the group's device is not available)."""
    from seqpar_compiler.auto_schedule import _profile
    from seqpar_compiler.input_check import check_same_inputs
    from seqpar_compiler.profile import calibrate
    from seqpar_compiler.runtime.comm import check_agreement
    from seqpar_compiler.runtime.control import control_barrier, control_broadcast_object
    from seqpar_compiler.torch_compat import control_device
    cuda_only = dist.new_group(list(range(P)), backend="cuda:gloo")
    both = dist.new_group(list(range(P)), backend="cpu:gloo,cuda:gloo")
    q = torch.randn(1, 2, 8, 8)
    sites = {
        "premise: a CPU tensor on the group": lambda: dist.all_reduce(torch.zeros(1), group=cuda_only),
        "agreement check": lambda: check_agreement(cuda_only, {"a": 1}, "test"),
        "same-batch check": lambda: check_same_inputs([torch.ones(3)], cuda_only),
        "ring_attention": lambda: sp.ring_attention(q, q, q, group=cuda_only),
        "auto's broadcast": lambda: control_broadcast_object("zigzag", cuda_only),
        "auto's profile": lambda: _profile(None, cuda_only),
        "calibration": lambda: calibrate(cuda_only, save=False),
        "barrier": lambda: control_barrier(cuda_only),
    }
    out = {name: _error(fn) for name, fn in sites.items()}
    out["device: gloo"] = str(control_device(dist.group.WORLD))
    out["device: cpu:gloo,cuda:gloo"] = str(control_device(both))
    # the CPU group still works after the failed calls on the other one
    out["after"] = float(sp.ring_attention(q, q, q).sum()) == float(sp.ring_attention(q, q, q).sum())
    return out


def _ring(rank, P, schedule, causal, staged):
    from seqpar_compiler.runtime.comm import set_host_staging
    S, B, Hq, Hkv, D = 16 * P, 2, 4, 2, 16
    g = torch.Generator().manual_seed(7)
    q64, dout64 = (torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    k64, v64 = (torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    idx = local_positions(schedule, rank, P, S)
    q, k, v = (t[:, :, idx].float().requires_grad_() for t in (q64, k64, v64))
    set_host_staging(staged)
    try:
        with sp.stats() as s:
            out = sp.ring_attention(q, k, v, causal=causal, schedule=schedule)
            out.backward(dout64[:, :, idx].float())
    finally:
        set_host_staging(None)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q64, k64, v64))
    ref, _ = reference_attention(qr, kr, vr, causal=causal)
    ref.backward(dout64)
    err = max(float((x.double() - r[:, :, idx]).norm() / r[:, :, idx].norm())
              for x, r in ((out, ref), (q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)))
    return {"tensors": [t.detach().clone() for t in (out, q.grad, k.grad, v.grad)], "rel_err": err,
            "host_staged_bytes": s.host_staged_bytes, "ring_bytes": s.bytes_sent + s.bytes_received}


def host_staging_cases(rank, P):
    """The ring with every transfer staged through host buffers, and without, per schedule."""
    return {f"{schedule}/{'staged' if staged else 'direct'}": _ring(rank, P, schedule, True, staged)
            for schedule in ("ring", "zigzag", "distflash") for staged in (True, False)}


def run_all(rank, P):
    return {"control": control_sites_on_cuda_only_group(rank, P), "staging": host_staging_cases(rank, P)}
