"""The all-to-all op pair: ``seqpar::ulysses_attention`` → (out, lse) and
``seqpar::ulysses_attention_backward`` → (dq, dk, dv) (issue 15; algorithm in ``ulysses.py``).

The same design as the ring's pair (``ring_op.py``): ``torch.library.custom_op``s with fake
kernels, the forward's registered backward calls the backward op, so aot_autograd saves
(out, lse) and never recomputes the attention; bodies run below autograd. The arguments are the
ring op's, in the same order, so the attention rule emits either op from one argument list;
``schedule`` is a layout name: ``ulysses`` (degree u = P) or ``hybrid:u``.

Shape legend: q [B,Hq,S_local,D], k [B,Hkv,S_local,D], v [B,Hkv,S_local,Dv], doc_ids [B,S_local]
or None, alibi_slopes [Hq] or None; out [B,Hq,S_local,Dv] in the wire layout ([B,S_local,Hq,Dv]
memory, like the ring's), lse [B,Hq,S_local] fp32 (fp64 for fp64 inputs). S_local is sharded in
the schedule's layout (``layout.py``).
"""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar_compiler.kernels import KERNELS, resolve_kernel

from .comm import check_agreement, empty_wire
from .layout import check_sequence_length, split_schedule
from .ring import RingConfig
from .ring_op import _float_bits, _slopes_crc, check_ring_inputs, resolve_group
from .stats import record
from .ulysses import check_heads, ulysses_backward, ulysses_forward, ulysses_groups

__all__ = ["ulysses_degree_of", "check_ulysses_inputs", "ulysses_attention_op", "ulysses_attention_backward_op"]

_checked: set = set()


def ulysses_degree_of(schedule: str, P: int) -> int:
    """The all-to-all degree a layout name implies: P for ``ulysses``, u for ``hybrid:u``."""
    name, u = split_schedule(schedule)
    if name == "ulysses":
        return P
    if name == "hybrid" and u is not None:
        return u
    raise ValueError(f"all-to-all attention takes schedule 'ulysses' or 'hybrid:u' (u = the Ulysses degree, "
                     f"dividing the group size {P}); got {schedule!r}")


def check_ulysses_inputs(q, k, v, doc_ids, window, schedule: str, kernel: str, P: int,
                         alibi_slopes=None, softcap=None) -> int:
    """Clear errors for inputs the all-to-all attention cannot take; returns the degree u."""
    u = ulysses_degree_of(schedule, P)
    # the ring's checks of shapes, dtypes, masks and score options hold here too ("ring": any length
    # that is a multiple of P; the layout's own multiple is checked next)
    check_ring_inputs(q, k, v, doc_ids, window, "ring", kernel, P, alibi_slopes, softcap)
    check_heads(q.shape[1], k.shape[1], u, P)
    check_sequence_length(q.shape[2] * P, schedule, P, what="global sequence length")
    return u


def _setup(q, k, v, doc_ids, scale, causal, window, schedule, group_name, overlap, kernel, alibi_slopes, softcap):
    group = resolve_group(group_name)
    P = 1 if group is None else dist.get_world_size(group)
    u = check_ulysses_inputs(q, k, v, doc_ids, window, schedule, kernel, P, alibi_slopes, softcap)
    if group is not None:
        fields = {"q_shape": zlib.crc32(str(tuple(q.shape)).encode()),
                  "kv_shape": zlib.crc32(str((tuple(k.shape), tuple(v.shape))).encode()),
                  "dtype": zlib.crc32(str(q.dtype).encode()), "degree": u, "causal": int(causal),
                  "window": -1 if window is None else window, "doc_ids": int(doc_ids is not None),
                  "scale": _float_bits(scale), "kernel": KERNELS.index(kernel),
                  "alibi_slopes": _slopes_crc(alibi_slopes), "softcap": _float_bits(softcap)}
        key = (id(group), tuple(fields.values()))
        if key not in _checked:
            check_agreement(group, fields, "ulysses_attention")
            _checked.add(key)
    cfg = RingConfig(schedule="ring", causal=causal, window=window, scale=scale,
                     kernel=resolve_kernel(kernel, q.device, q.dtype), overlap=overlap,
                     alibi_slopes=alibi_slopes, softcap=softcap)
    return cfg, ulysses_groups(group, u if group is not None else 1)


def _group_size(group_name: str) -> int:
    group = resolve_group(group_name)
    return 1 if group is None else dist.get_world_size(group)


@torch.library.custom_op("seqpar::ulysses_attention", mutates_args=())
def ulysses_attention_op(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None, scale: float, causal: bool,
                         window: int | None, schedule: str, group_name: str, overlap: bool,
                         kernel: str, alibi_slopes: Tensor | None = None,
                         softcap: float | None = None) -> tuple[Tensor, Tensor]:
    cfg, groups = _setup(q, k, v, doc_ids, scale, causal, window, schedule, group_name, overlap, kernel,
                         alibi_slopes, softcap)
    record(attention_forward_calls=1)
    return ulysses_forward(q, k, v, doc_ids, cfg, groups)


@ulysses_attention_op.register_fake
def _(q, k, v, doc_ids, scale, causal, window, schedule, group_name, overlap, kernel, alibi_slopes=None,
      softcap=None):
    check_ulysses_inputs(q, k, v, doc_ids, window, schedule, kernel, _group_size(group_name), alibi_slopes, softcap)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (empty_wire((*q.shape[:3], v.shape[-1]), q.dtype, q.device),
            q.new_empty(q.shape[:3], dtype=lse_dtype))


@torch.library.custom_op("seqpar::ulysses_attention_backward", mutates_args=())
def ulysses_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                  doc_ids: Tensor | None, dlse: Tensor | None, scale: float, causal: bool,
                                  window: int | None, schedule: str, group_name: str, overlap: bool,
                                  kernel: str, alibi_slopes: Tensor | None = None,
                                  softcap: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    cfg, groups = _setup(q, k, v, doc_ids, scale, causal, window, schedule, group_name, overlap, kernel,
                         alibi_slopes, softcap)
    record(attention_backward_calls=1)
    # as the ring: an all-zero lse gradient (decided on real data) is dropped
    if dlse is not None and not bool(dlse.ne(0).any()):
        dlse = None
    return ulysses_backward(dout, q, k, v, out, lse, doc_ids, cfg, groups, dlse)


@ulysses_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, doc_ids, dlse, scale, causal, window, schedule, group_name, overlap, kernel,
      alibi_slopes=None, softcap=None):
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
    dq, dk, dv = ulysses_attention_backward_op(dout, q, k, v, out, lse, doc_ids, dlse, *ctx.options, *extra)
    return (dq, dk, dv) + (None,) * (ctx.num_inputs - 3)


ulysses_attention_op.register_autograd(_backward, setup_context=_setup_context)
