"""The op pair the compiler places in graphs: ``seqpar::ring_attention`` → (out, lse) and
``seqpar::ring_attention_backward`` → (dq, dk, dv) (DESIGN §3).

Both are ``torch.library.custom_op``s with fake kernels, so Dynamo and aot_autograd see opaque
nodes of known shapes; the forward's registered backward just calls the backward op, so the
partitioner sees (out, lse) as the values to save. The bodies run below autograd and compute
gradients with the kernels' backward. The process group travels by name (a string is a legal
op argument; a ProcessGroup is not); ``""`` means a group of one.

Shape legend: q [B,Hq,S_local,D], k/v [B,Hkv,S_local,D], doc_ids [B,S_local] or None,
out [B,Hq,S_local,D], lse [B,Hq,S_local] fp32 (fp64 for fp64 inputs). S_local is sharded in
the schedule's layout. out, dq, dk, dv are laid out as [B, S_local, H, D] in memory (the ring's
wire layout, ``comm.py``), and both the real ops and the fakes say so: inductor plans the
consumers' strides from the fakes.
"""
from __future__ import annotations

import struct
import zlib

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar_compiler.kernels import KERNELS, resolve_kernel

from .comm import RingComm, check_agreement, empty_wire
from .layout import SCHEDULES, check_sequence_length
from .ring import RingConfig, ring_backward, ring_forward
from .stats import record

__all__ = ["check_ring_inputs", "resolve_group", "ring_attention_op", "ring_attention_backward_op"]

_checked_configs: set = set()


def resolve_group(group_name: str) -> dist.ProcessGroup | None:
    """The process group behind a name; None for a group of one."""
    if not group_name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group
    group = _resolve_process_group(group_name)
    return None if dist.get_world_size(group) == 1 else group


def _group_size(group_name: str) -> int:
    group = resolve_group(group_name)
    return 1 if group is None else dist.get_world_size(group)


def check_ring_inputs(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None, window: int | None,
                      schedule: str, kernel: str, P: int) -> None:
    """Clear errors for inputs the ring cannot take, naming what is allowed."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"ring_attention expects 4-D [B, H, S_local, D] tensors; {name} has shape "
                             f"{tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on batch, local sequence "
                         f"length and head dim ([B, H, S_local, D])")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}) "
                         f"for GQA/MQA")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"ring_attention needs floating-point inputs; got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if window is not None and window < 1:
        raise ValueError(f"window must be an int >= 1 (keys with q - window < k <= q are visible); got {window}")
    if doc_ids is not None:
        if doc_ids.shape != (q.shape[0], q.shape[2]) or doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
            raise ValueError(f"doc_ids must be an integer tensor of shape [B, S_local] = "
                             f"{[q.shape[0], q.shape[2]]}; got {doc_ids.dtype} {tuple(doc_ids.shape)}")
        if doc_ids.device != q.device:
            raise ValueError(f"doc_ids must be on q's device {q.device}; got {doc_ids.device}")
    check_sequence_length(q.shape[2] * P, schedule, P, what="global sequence length")


def _agree(q, k, doc_ids, scale, causal, window, schedule, kernel, group) -> None:
    """Once per new configuration, check every rank of the group passed the same one."""
    fields = {
        "q_shape": zlib.crc32(str(tuple(q.shape)).encode()),
        "kv_shape": zlib.crc32(str(tuple(k.shape)).encode()),
        "dtype": zlib.crc32(str(q.dtype).encode()),
        "schedule": SCHEDULES.index(schedule),
        "causal": int(causal),
        "window": -1 if window is None else window,
        "doc_ids": int(doc_ids is not None),
        "scale": struct.unpack("<q", struct.pack("<d", scale))[0],
        "kernel": KERNELS.index(kernel),
    }
    key = (id(group), tuple(fields.values()))
    if key in _checked_configs:
        return
    check_agreement(group, fields, "ring_attention")
    _checked_configs.add(key)


def _setup(q, k, v, doc_ids, scale, causal, window, schedule, group_name, overlap, kernel):
    group = resolve_group(group_name)
    P = 1 if group is None else dist.get_world_size(group)
    check_ring_inputs(q, k, v, doc_ids, window, schedule, kernel, P)
    if group is not None:
        _agree(q, k, doc_ids, scale, causal, window, schedule, kernel, group)
    cfg = RingConfig(schedule=schedule, causal=causal, window=window, scale=scale,
                     kernel=resolve_kernel(kernel, q.device, q.dtype), overlap=overlap)
    return cfg, RingComm(group)


@torch.library.custom_op("seqpar::ring_attention", mutates_args=())
def ring_attention_op(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None, scale: float, causal: bool,
                      window: int | None, schedule: str, group_name: str, overlap: bool,
                      kernel: str) -> tuple[Tensor, Tensor]:
    cfg, comm = _setup(q, k, v, doc_ids, scale, causal, window, schedule, group_name, overlap, kernel)
    record(attention_forward_calls=1)
    return ring_forward(q, k, v, doc_ids, cfg, comm)


@ring_attention_op.register_fake
def _(q, k, v, doc_ids, scale, causal, window, schedule, group_name, overlap, kernel):
    check_ring_inputs(q, k, v, doc_ids, window, schedule, kernel, _group_size(group_name))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # the real op returns out laid out as [B, S_local, Hq, D] in memory (the ring's wire layout,
    # also ATen flash's): the model's following transpose + reshape is then free
    return empty_wire(q.shape, q.dtype, q.device), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("seqpar::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                               doc_ids: Tensor | None, dlse: Tensor | None, scale: float, causal: bool,
                               window: int | None, schedule: str, group_name: str, overlap: bool,
                               kernel: str) -> tuple[Tensor, Tensor, Tensor]:
    cfg, comm = _setup(q, k, v, doc_ids, scale, causal, window, schedule, group_name, overlap, kernel)
    record(attention_backward_calls=1)
    # A gradient on the lse is rare (the compiler never makes one) and only the math kernel
    # takes it; drop an all-zero one. Decided here, on real data, not in the traced formula.
    if dlse is not None and not bool(dlse.ne(0).any()):
        dlse = None
    return ring_backward(dout, q, k, v, out, lse, doc_ids, cfg, comm, dlse)


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, doc_ids, dlse, scale, causal, window, schedule, group_name, overlap, kernel):
    # the real op returns gradients in the wire layout whatever the inputs' strides; say the same here
    return tuple(empty_wire(t.shape, t.dtype, t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, doc_ids, scale, causal, window, schedule, group_name, overlap, kernel = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, doc_ids)
    ctx.options = (scale, causal, window, schedule, group_name, overlap, kernel)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, doc_ids = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = ring_attention_backward_op(dout, q, k, v, out, lse, doc_ids, dlse, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, None, None


ring_attention_op.register_autograd(_backward, setup_context=_setup_context)
