"""The op pair the compiler places in graphs: ``seqpar::ring_attention`` → (out, lse) and
``seqpar::ring_attention_backward`` → (dq, dk, dv) (DESIGN §3).

Both are ``torch.library.custom_op``s with fake kernels, so Dynamo and aot_autograd see opaque
nodes of known shapes; the forward's registered backward just calls the backward op, so the
partitioner sees (out, lse) as the values to save. The bodies run below autograd and compute
gradients with the kernels' backward. The process group travels by name (a string is a legal
op argument; a ProcessGroup is not); ``""`` means a group of one.

Shape legend: q [B,Hq,S_local,D], k [B,Hkv,S_local,D], v [B,Hkv,S_local,Dv] (Dv may differ
from D), doc_ids [B,S_local] or None, alibi_slopes [Hq] float or None, out [B,Hq,S_local,Dv],
lse [B,Hq,S_local] fp32 (fp64 for fp64 inputs). S_local is sharded in the schedule's layout.
out, dq, dk, dv are laid out as [B, S_local, H, D] in memory (the ring's wire layout,
``comm.py``), and both the real ops and the fakes say so: inductor plans the consumers'
strides from the fakes.

Score semantics (issue 12): ``alibi_slopes`` adds ``slopes[h] · (k_pos − q_pos)`` over global
positions, ``softcap`` caps scores as ``cap · tanh(s / cap)`` (before the bias). Both are the
last two arguments, defaulting to None, so graphs made before them still run; the slopes get
no gradient (ALiBi's are fixed; ``ring_attention`` refuses slopes that require one).
"""
from __future__ import annotations

import math
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
                      schedule: str, kernel: str, P: int, alibi_slopes: Tensor | None = None,
                      softcap: float | None = None) -> None:
    """Clear errors for inputs the ring cannot take, naming what is allowed."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"ring_attention expects 4-D [B, H, S_local, D] tensors; {name} has shape "
                             f"{tuple(t.shape)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree on batch, heads and local sequence length (v's head dim may "
                         f"differ); got k {tuple(k.shape)}, v {tuple(v.shape)}")
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
    if alibi_slopes is not None and (alibi_slopes.shape != (q.shape[1],) or not alibi_slopes.dtype.is_floating_point
                                     or alibi_slopes.device != q.device):
        raise ValueError(f"alibi_slopes must be a float tensor of shape [Hq] = [{q.shape[1]}] on q's device "
                         f"{q.device}; got {alibi_slopes.dtype} {tuple(alibi_slopes.shape)} on {alibi_slopes.device}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite float > 0 (scores become softcap * tanh(s / softcap)); "
                         f"got {softcap}")
    check_sequence_length(q.shape[2] * P, schedule, P, what="global sequence length")


def _float_bits(x: float | None) -> int:
    return -1 if x is None else struct.unpack("<q", struct.pack("<d", x))[0]


def _slopes_crc(alibi_slopes: Tensor | None) -> int:
    """A checksum of the slope values (Hq numbers: one tiny device-to-host copy)."""
    if alibi_slopes is None:
        return -1
    return zlib.crc32(alibi_slopes.detach().to("cpu", torch.float64).numpy().tobytes())


def _agree(q, k, v, doc_ids, scale, causal, window, schedule, kernel, group, alibi_slopes, softcap) -> None:
    """Once per new configuration, check every rank of the group passed the same one."""
    fields = {
        "q_shape": zlib.crc32(str(tuple(q.shape)).encode()),
        "kv_shape": zlib.crc32(str((tuple(k.shape), tuple(v.shape))).encode()),
        "dtype": zlib.crc32(str(q.dtype).encode()),
        "schedule": SCHEDULES.index(schedule),
        "causal": int(causal),
        "window": -1 if window is None else window,
        "doc_ids": int(doc_ids is not None),
        "scale": _float_bits(scale),
        "kernel": KERNELS.index(kernel),
        "alibi_slopes": _slopes_crc(alibi_slopes),
        "softcap": _float_bits(softcap),
    }
    key = (id(group), tuple(fields.values()))
    if key in _checked_configs:
        return
    check_agreement(group, fields, "ring_attention")
    _checked_configs.add(key)


def _setup(q, k, v, doc_ids, scale, causal, window, schedule, group_name, overlap, kernel, alibi_slopes, softcap):
    group = resolve_group(group_name)
    P = 1 if group is None else dist.get_world_size(group)
    check_ring_inputs(q, k, v, doc_ids, window, schedule, kernel, P, alibi_slopes, softcap)
    if group is not None:
        _agree(q, k, v, doc_ids, scale, causal, window, schedule, kernel, group, alibi_slopes, softcap)
    cfg = RingConfig(schedule=schedule, causal=causal, window=window, scale=scale,
                     kernel=resolve_kernel(kernel, q.device, q.dtype), overlap=overlap,
                     alibi_slopes=alibi_slopes, softcap=softcap)
    return cfg, RingComm(group)


@torch.library.custom_op("seqpar::ring_attention", mutates_args=())
def ring_attention_op(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None, scale: float, causal: bool,
                      window: int | None, schedule: str, group_name: str, overlap: bool,
                      kernel: str, alibi_slopes: Tensor | None = None,
                      softcap: float | None = None) -> tuple[Tensor, Tensor]:
    cfg, comm = _setup(q, k, v, doc_ids, scale, causal, window, schedule, group_name, overlap, kernel,
                       alibi_slopes, softcap)
    record(attention_forward_calls=1)
    return ring_forward(q, k, v, doc_ids, cfg, comm)


@ring_attention_op.register_fake
def _(q, k, v, doc_ids, scale, causal, window, schedule, group_name, overlap, kernel, alibi_slopes=None,
      softcap=None):
    check_ring_inputs(q, k, v, doc_ids, window, schedule, kernel, _group_size(group_name), alibi_slopes, softcap)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # the real op returns out [B, Hq, S_local, Dv] laid out as [B, S_local, Hq, Dv] in memory (the
    # ring's wire layout, also ATen flash's): the model's following transpose + reshape is then free
    return (empty_wire((*q.shape[:3], v.shape[-1]), q.dtype, q.device),
            q.new_empty(q.shape[:3], dtype=lse_dtype))


@torch.library.custom_op("seqpar::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                               doc_ids: Tensor | None, dlse: Tensor | None, scale: float, causal: bool,
                               window: int | None, schedule: str, group_name: str, overlap: bool,
                               kernel: str, alibi_slopes: Tensor | None = None,
                               softcap: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    cfg, comm = _setup(q, k, v, doc_ids, scale, causal, window, schedule, group_name, overlap, kernel,
                       alibi_slopes, softcap)
    record(attention_backward_calls=1)
    # A gradient on the lse is rare (the compiler never makes one) and only the math kernel
    # takes it; drop an all-zero one. Decided here, on real data, not in the traced formula.
    if dlse is not None and not bool(dlse.ne(0).any()):
        dlse = None
    return ring_backward(dout, q, k, v, out, lse, doc_ids, cfg, comm, dlse)


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, doc_ids, dlse, scale, causal, window, schedule, group_name, overlap, kernel,
      alibi_slopes=None, softcap=None):
    # the real op returns gradients in the wire layout whatever the inputs' strides; say the same here
    return tuple(empty_wire(t.shape, t.dtype, t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, doc_ids, scale, causal, window, schedule, group_name, overlap, kernel, *rest = inputs
    alibi_slopes, softcap = (rest + [None, None])[:2]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, doc_ids, alibi_slopes)
    ctx.options = (scale, causal, window, schedule, group_name, overlap, kernel)
    ctx.softcap = softcap
    ctx.num_inputs = len(inputs)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, doc_ids, alibi_slopes = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    extra = () if alibi_slopes is None and ctx.softcap is None else (alibi_slopes, ctx.softcap)
    dq, dk, dv = ring_attention_backward_op(dout, q, k, v, out, lse, doc_ids, dlse, *ctx.options, *extra)
    return (dq, dk, dv) + (None,) * (ctx.num_inputs - 3)


ring_attention_op.register_autograd(_backward, setup_context=_setup_context)
