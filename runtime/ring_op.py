"""The op pair the compiler places in graphs: ``seqpar::ring_attention`` → (out, lse) and
``seqpar::ring_attention_backward`` → (dq, dk, dv) (docs/architecture.md).

Both are ``torch.library.custom_op``s with fake kernels, so Dynamo and aot_autograd see opaque
nodes of known shapes; the forward's registered backward just calls the backward op, so the
partitioner sees (out, lse) as the values to save. The bodies run below autograd and compute
gradients with the kernels' backward. The process group travels by name (a string is a legal
op argument; a ProcessGroup is not); ``""`` means a group of one.

Shape legend: q [B,Hq,S_local,D], k [B,Hkv,S_local,D], v [B,Hkv,S_local,Dv] (Dv may differ
from D), doc_ids [B,S_local] integer or None, key_padding [B,S_local] bool (True = a key that
may be seen) or None, alibi_slopes [Hq] float or None, rel_bias [Hq, 2S-1] float or None (S the global
length), out [B,Hq,S_local,Dv], lse [B,Hq,S_local]
fp32 (fp64 for fp64 inputs). S_local is sharded in the schedule's layout. out, dq, dk, dv are
laid out as [B, S_local, H, D] in memory (the ring's wire layout, ``comm.py``), and both the
real ops and the fakes say so: inductor plans the consumers' strides from the fakes.

What the attention computes is one ``AttentionSpec`` (``kernels/attention_spec.py``), passed
encoded as ``spec`` (a custom op takes no dataclass; the string is also what the dump shows);
the tensors it names (document ids, key validity, ALiBi slopes, a relative-position table) follow
as the last, optional arguments. The slopes get no gradient (ALiBi's are fixed; ``ring_attention``
refuses slopes that require one). A table that requires grad (T5's learned bias) gets this rank's
part of its gradient, summed over the blocks its ring computed: the table is replicated, so the
caller sums it over ranks (the compiled rewrite's gradient all-reduce of a replicated input,
``ring_attention``'s ``sum_grad_over_group``). Key validity and document ids are integer data.
"""
from __future__ import annotations

import dataclasses
import struct
import zlib

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar_compiler.kernels import KERNELS, AttentionSpec, resolve_kernel

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


def check_ring_inputs(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, schedule: str, kernel: str, P: int,
                      doc_ids: Tensor | None = None, key_padding: Tensor | None = None,
                      alibi_slopes: Tensor | None = None, rel_bias: Tensor | None = None) -> None:
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
    if spec.scale is None:
        raise ValueError("the attention spec passed to the ring must have a scale")
    per_token = (("doc_ids", doc_ids, spec.docs, "an integer"), ("key_padding", key_padding, spec.key_padding,
                                                                  "a bool (True = the key may be seen)"))
    for name, t, flagged, kind in per_token:
        if (t is not None) != flagged:
            raise ValueError(f"{name} {'given' if t is not None else 'missing'} for an attention spec "
                             f"{'without' if t is not None else 'with'} it ({spec.describe()})")
        if t is None:
            continue
        ok = t.dtype == torch.bool if name == "key_padding" else not (t.dtype.is_floating_point or t.dtype == torch.bool)
        if t.shape != (q.shape[0], q.shape[2]) or not ok:
            raise ValueError(f"{name} must be {kind} tensor of shape [B, S_local] = {[q.shape[0], q.shape[2]]}; "
                             f"got {t.dtype} {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {t.device}")
    if (alibi_slopes is not None) != spec.alibi:
        raise ValueError(f"alibi_slopes {'given' if alibi_slopes is not None else 'missing'} for an attention "
                         f"spec {'without' if alibi_slopes is not None else 'with'} ALiBi ({spec.describe()})")
    if alibi_slopes is not None and (alibi_slopes.shape != (q.shape[1],) or not alibi_slopes.dtype.is_floating_point
                                     or alibi_slopes.device != q.device):
        raise ValueError(f"alibi_slopes must be a float tensor of shape [Hq] = [{q.shape[1]}] on q's device "
                         f"{q.device}; got {alibi_slopes.dtype} {tuple(alibi_slopes.shape)} on {alibi_slopes.device}")
    if (rel_bias is not None) != spec.rel_bias:
        raise ValueError(f"rel_bias {'given' if rel_bias is not None else 'missing'} for an attention spec "
                         f"{'without' if rel_bias is not None else 'with'} a relative-position bias ({spec.describe()})")
    S = q.shape[2] * P
    if rel_bias is not None and (tuple(rel_bias.shape) != (q.shape[1], 2 * S - 1)
                                 or not rel_bias.dtype.is_floating_point or rel_bias.device != q.device):
        raise ValueError(f"rel_bias must be a float tensor of shape [Hq, 2S - 1] = [{q.shape[1]}, {2 * S - 1}] on q's "
                         f"device {q.device}; got {rel_bias.dtype} {tuple(rel_bias.shape)} on {rel_bias.device}")
    check_sequence_length(S, schedule, P, what="global sequence length")


def _float_bits(x: float | None) -> int:
    return -1 if x is None else struct.unpack("<q", struct.pack("<d", x))[0]


def _slopes_crc(alibi_slopes: Tensor | None) -> int:
    """A checksum of the slope values (Hq numbers: one tiny device-to-host copy)."""
    if alibi_slopes is None:
        return -1
    return zlib.crc32(alibi_slopes.detach().to("cpu", torch.float64).numpy().tobytes())


def spec_fields(spec: AttentionSpec) -> dict[str, int]:
    """The spec as agreement fields, one per thing a user sets (an error names the one that
    differs): causal, window, the band, scale, documents, key padding, ALiBi, soft-cap."""
    return {"causal": int(spec.causal), "window": -1 if spec.window is None else spec.window,
            "band": zlib.crc32(repr((spec.behind, spec.ahead)).encode()), "scale": _float_bits(spec.scale),
            "doc_ids": int(spec.docs), "key_padding": int(spec.key_padding), "alibi": int(spec.alibi),
            "softcap": _float_bits(spec.softcap)}


def _agree(q, k, v, spec: AttentionSpec, schedule, kernel, group, alibi_slopes, rel_bias) -> None:
    """Once per new configuration, check every rank of the group passed the same one."""
    fields = {
        "q_shape": zlib.crc32(str(tuple(q.shape)).encode()),
        "kv_shape": zlib.crc32(str((tuple(k.shape), tuple(v.shape))).encode()),
        "dtype": zlib.crc32(str(q.dtype).encode()),
        "schedule": SCHEDULES.index(schedule),
        **spec_fields(spec),
        "kernel": KERNELS.index(kernel),
        "alibi_slopes": _slopes_crc(alibi_slopes),
        "rel_bias": _slopes_crc(rel_bias),
    }
    key = (id(group), tuple(fields.values()))
    if key in _checked_configs:
        return
    check_agreement(group, fields, "ring_attention")
    _checked_configs.add(key)


def _setup(q, k, v, spec_text, schedule, group_name, overlap, kernel, doc_ids, key_padding, alibi_slopes,
           rel_bias=None):
    group = resolve_group(group_name)
    P = 1 if group is None else dist.get_world_size(group)
    spec = AttentionSpec.decode(spec_text)
    check_ring_inputs(q, k, v, spec, schedule, kernel, P, doc_ids, key_padding, alibi_slopes, rel_bias)
    if group is not None:
        _agree(q, k, v, spec, schedule, kernel, group, alibi_slopes, rel_bias)
    cfg = RingConfig(schedule=schedule, spec=spec, kernel=resolve_kernel(kernel, q.device, q.dtype), overlap=overlap,
                     alibi_slopes=alibi_slopes, rel_bias=rel_bias)
    return cfg, RingComm(group)


def wire_validity(key_padding: Tensor | None) -> Tensor | None:
    """Key validity as it travels (between ranks and through the all-to-all): uint8, which every
    backend sends (gloo has no bool)."""
    return None if key_padding is None else key_padding.to(torch.uint8).contiguous()


@torch.library.custom_op("seqpar::ring_attention", mutates_args=())
def ring_attention_op(q: Tensor, k: Tensor, v: Tensor, spec: str, schedule: str, group_name: str, overlap: bool,
                      kernel: str, doc_ids: Tensor | None = None, key_padding: Tensor | None = None,
                      alibi_slopes: Tensor | None = None, rel_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    cfg, comm = _setup(q, k, v, spec, schedule, group_name, overlap, kernel, doc_ids, key_padding, alibi_slopes,
                       rel_bias)
    record(attention_forward_calls=1)
    return ring_forward(q, k, v, doc_ids, cfg, comm, wire_validity(key_padding))


@ring_attention_op.register_fake
def _(q, k, v, spec, schedule, group_name, overlap, kernel, doc_ids=None, key_padding=None, alibi_slopes=None,
      rel_bias=None):
    check_ring_inputs(q, k, v, AttentionSpec.decode(spec), schedule, kernel, _group_size(group_name), doc_ids,
                      key_padding, alibi_slopes, rel_bias)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # the real op returns out [B, Hq, S_local, Dv] laid out as [B, S_local, Hq, Dv] in memory (the
    # ring's wire layout, also ATen flash's): the model's following transpose + reshape is then free
    return (empty_wire((*q.shape[:3], v.shape[-1]), q.dtype, q.device),
            q.new_empty(q.shape[:3], dtype=lse_dtype))


@torch.library.custom_op("seqpar::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                               dlse: Tensor | None, spec: str, schedule: str, group_name: str, overlap: bool,
                               kernel: str, doc_ids: Tensor | None = None, key_padding: Tensor | None = None,
                               alibi_slopes: Tensor | None = None, rel_bias: Tensor | None = None,
                               rel_bias_grad: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d_rel_bias): d_rel_bias [Hq, 2S - 1] is this rank's part of a learned table's
    gradient (the pairs its ring computed, help tasks included; the caller sums it over ranks)
    with ``rel_bias_grad``, else an empty tensor."""
    cfg, comm = _setup(q, k, v, spec, schedule, group_name, overlap, kernel, doc_ids, key_padding, alibi_slopes,
                       rel_bias)
    record(attention_backward_calls=1)
    # A gradient on the lse is rare (the compiler never makes one) and only the math kernel
    # takes it; drop an all-zero one. Decided here, on real data, not in the traced formula.
    if dlse is not None and not bool(dlse.ne(0).any()):
        dlse = None
    d_table = q.new_empty(0)
    if rel_bias_grad and rel_bias is not None:
        d_table = torch.zeros(rel_bias.shape, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                              device=q.device)
        cfg = dataclasses.replace(cfg, rel_bias_grad=d_table)
    dq, dk, dv = ring_backward(dout, q, k, v, out, lse, doc_ids, cfg, comm, dlse, wire_validity(key_padding))
    return dq, dk, dv, d_table if d_table.numel() == 0 else d_table.to(rel_bias.dtype)


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, dlse, spec, schedule, group_name, overlap, kernel, doc_ids=None, key_padding=None,
      alibi_slopes=None, rel_bias=None, rel_bias_grad=False):
    # the real op returns gradients in the wire layout whatever the inputs' strides; say the same here
    grads = tuple(empty_wire(t.shape, t.dtype, t.device) for t in (q, k, v))
    d_table = rel_bias.new_empty(rel_bias.shape) if rel_bias_grad and rel_bias is not None else q.new_empty(0)
    return (*grads, d_table)


def _setup_context(ctx, inputs, output):
    q, k, v, spec, schedule, group_name, overlap, kernel, *rest = inputs
    doc_ids, key_padding, alibi_slopes, rel_bias = (list(rest) + [None] * 4)[:4]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, doc_ids, key_padding, alibi_slopes, rel_bias)
    ctx.options = (spec, schedule, group_name, overlap, kernel)
    ctx.num_inputs = len(inputs)


_REL_BIAS = 11          # the op's argument index of rel_bias


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, doc_ids, key_padding, alibi_slopes, rel_bias = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    table_grad = rel_bias is not None and ctx.needs_input_grad[_REL_BIAS]
    dq, dk, dv, d_table = ring_attention_backward_op(dout, q, k, v, out, lse, dlse, *ctx.options, doc_ids,
                                                     key_padding, alibi_slopes, rel_bias, table_grad)
    grads = [dq, dk, dv] + [None] * (ctx.num_inputs - 3)
    if table_grad:
        grads[_REL_BIAS] = d_table
    return tuple(grads)


ring_attention_op.register_autograd(_backward, setup_context=_setup_context)
