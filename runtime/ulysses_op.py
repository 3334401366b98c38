"""The all-to-all op pair: ``seqpar::ulysses_attention`` → (out, lse, *saved) and
``seqpar::ulysses_attention_backward`` → (dq, dk, dv) (algorithm in ``ulysses.py``).

The same design as the ring's pair (``ring_op.py``): ``torch.library.custom_op``s with fake
kernels, the forward's registered backward calls the backward op, so aot_autograd saves what the
backward needs and never recomputes the attention; bodies run below autograd. The arguments are
the ring op's, in the same order, so the attention rule emits either op from one argument list
and reads output 0; ``schedule`` is a layout name: ``ulysses`` (degree u = P) or ``hybrid:u``.

Outputs 2–6 are the forward's head-sharded q_g, k_g, v_g, out_g, lse_g (``ulysses.Saved``,
non-differentiable): the backward takes them instead of q, k, v, out, lse, so it moves only
dout in and the gradients out by all-to-all (the forward's inputs need not travel again).
The remat-aware partitioner policy saves every output of the op (its getitems).

Shape legend: q [B,Hq,S_local,D], k [B,Hkv,S_local,D], v [B,Hkv,S_local,Dv], doc_ids [B,S_local]
or None, key_padding [B,S_local] bool or None, alibi_slopes [Hq] or None, rel_bias [Hq,2S-1] or None;
out [B,Hq,S_local,Dv]
in the wire layout ([B,S_local,Hq,Dv] memory, like the ring's), lse [B,Hq,S_local] fp32 (fp64 for
fp64 inputs); saved: q_g [B,Hq/u,S_g,D], k_g/v_g [B,R/u,S_g,D|Dv], out_g [B,Hq/u,S_g,Dv] (wire
layout), lse_g [B,Hq/u,S_g] (S_g = u·S_local, R = KV heads on the wire). S_local is sharded in the
schedule's layout (``layout.py``). What is computed is the encoded ``AttentionSpec`` ``spec``, as
for the ring op.
"""
from __future__ import annotations

import dataclasses

import zlib

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar_compiler.kernels import KERNELS, AttentionSpec, resolve_kernel

from .comm import check_agreement, empty_wire
from .layout import check_sequence_length, layout_of
from .ring import RingConfig
from .ring_op import _slopes_crc, check_ring_inputs, resolve_group, spec_fields, wire_validity
from .stats import record
from .ulysses import Saved, check_heads, saved_shapes, ulysses_backward, ulysses_forward, ulysses_groups

__all__ = ["ulysses_degree_of", "check_ulysses_inputs", "ulysses_attention_op", "ulysses_attention_backward_op"]

_checked: set = set()


def ulysses_degree_of(schedule: str, P: int) -> int:
    """The all-to-all degree a layout name implies: P for ``ulysses``, u for ``hybrid:u``."""
    return layout_of(schedule).ulysses_degree(P)


def check_ulysses_inputs(q, k, v, spec: AttentionSpec, schedule: str, kernel: str, P: int, doc_ids=None,
                         key_padding=None, alibi_slopes=None, rel_bias=None) -> int:
    """Clear errors for inputs the all-to-all attention cannot take; returns the degree u."""
    u = ulysses_degree_of(schedule, P)
    # the ring's checks of shapes, dtypes, masks and score options hold here too ("ring": any length
    # that is a multiple of P; the layout's own multiple is checked next)
    check_ring_inputs(q, k, v, spec, "ring", kernel, P, doc_ids, key_padding, alibi_slopes, rel_bias)
    check_heads(q.shape[1], k.shape[1], u, P)
    check_sequence_length(q.shape[2] * P, schedule, P, what="global sequence length")
    return u


def _setup(q, k, v, spec_text, schedule, group_name, overlap, kernel, doc_ids, key_padding, alibi_slopes, rel_bias):
    group = resolve_group(group_name)
    P = 1 if group is None else dist.get_world_size(group)
    spec = AttentionSpec.decode(spec_text)
    u = check_ulysses_inputs(q, k, v, spec, schedule, kernel, P, doc_ids, key_padding, alibi_slopes, rel_bias)
    if group is not None:
        fields = {"q_shape": zlib.crc32(str(tuple(q.shape)).encode()),
                  "kv_shape": zlib.crc32(str((tuple(k.shape), tuple(v.shape))).encode()),
                  "dtype": zlib.crc32(str(q.dtype).encode()), "degree": u, **spec_fields(spec),
                  "kernel": KERNELS.index(kernel), "alibi_slopes": _slopes_crc(alibi_slopes),
                  "rel_bias": _slopes_crc(rel_bias)}
        key = (id(group), tuple(fields.values()))
        if key not in _checked:
            check_agreement(group, fields, "ulysses_attention")
            _checked.add(key)
    return _config(q, spec, group, u, overlap, kernel, alibi_slopes, rel_bias)


def _config(q, spec: AttentionSpec, group, u, overlap, kernel, alibi_slopes, rel_bias=None):
    cfg = RingConfig(schedule="ring", spec=spec, kernel=resolve_kernel(kernel, q.device, q.dtype), overlap=overlap,
                     alibi_slopes=alibi_slopes, rel_bias=rel_bias)
    return cfg, ulysses_groups(group, u if group is not None else 1)


def _group_size(group_name: str) -> int:
    group = resolve_group(group_name)
    return 1 if group is None else dist.get_world_size(group)


@torch.library.custom_op("seqpar::ulysses_attention", mutates_args=())
def ulysses_attention_op(q: Tensor, k: Tensor, v: Tensor, spec: str, schedule: str, group_name: str, overlap: bool,
                         kernel: str, doc_ids: Tensor | None = None, key_padding: Tensor | None = None,
                         alibi_slopes: Tensor | None = None, rel_bias: Tensor | None = None
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg, groups = _setup(q, k, v, spec, schedule, group_name, overlap, kernel, doc_ids, key_padding, alibi_slopes,
                         rel_bias)
    record(attention_forward_calls=1)
    out, lse, saved = ulysses_forward(q, k, v, doc_ids, cfg, groups, wire_validity(key_padding))
    return (out, lse, *saved)


@ulysses_attention_op.register_fake
def _(q, k, v, spec, schedule, group_name, overlap, kernel, doc_ids=None, key_padding=None, alibi_slopes=None,
      rel_bias=None):
    u = check_ulysses_inputs(q, k, v, AttentionSpec.decode(spec), schedule, kernel, _group_size(group_name), doc_ids,
                             key_padding, alibi_slopes, rel_bias)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_g, k_g, v_g, out_g, lse_g = saved_shapes(q.shape, k.shape[1], v.shape[-1], u)
    return (empty_wire((*q.shape[:3], v.shape[-1]), q.dtype, q.device),
            q.new_empty(q.shape[:3], dtype=lse_dtype),
            empty_wire(q_g, q.dtype, q.device), empty_wire(k_g, k.dtype, q.device), empty_wire(v_g, v.dtype, q.device),
            empty_wire(out_g, q.dtype, q.device), q.new_empty(lse_g, dtype=lse_dtype))


@torch.library.custom_op("seqpar::ulysses_attention_backward", mutates_args=())
def ulysses_attention_backward_op(dout: Tensor, q_g: Tensor, k_g: Tensor, v_g: Tensor, out_g: Tensor, lse_g: Tensor,
                                  dlse: Tensor | None, kv_heads: int, spec: str, schedule: str, group_name: str,
                                  overlap: bool, kernel: str, doc_ids: Tensor | None = None,
                                  key_padding: Tensor | None = None, alibi_slopes: Tensor | None = None,
                                  rel_bias: Tensor | None = None, rel_bias_grad: bool = False
                                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d_rel_bias) from dout [B,Hq,S_local,Dv] and the forward's saved head-sharded
    tensors; the inputs were checked (and agreed on) by the forward. d_rel_bias [Hq, 2S - 1] with
    ``rel_bias_grad``: this rank's part of a learned table's gradient (its heads' rows, from the
    pairs its inner ring computed; zero elsewhere: the caller sums over ranks), else empty."""
    group = resolve_group(group_name)
    u = 1 if group is None else ulysses_degree_of(schedule, dist.get_world_size(group))
    cfg, groups = _config(q_g, AttentionSpec.decode(spec), group, u, overlap, kernel, alibi_slopes, rel_bias)
    record(attention_backward_calls=1)
    # as the ring: an all-zero lse gradient (decided on real data) is dropped
    if dlse is not None and not bool(dlse.ne(0).any()):
        dlse = None
    d_table = q_g.new_empty(0)
    if rel_bias_grad and rel_bias is not None:
        d_table = torch.zeros(rel_bias.shape, dtype=torch.float64 if q_g.dtype == torch.float64 else torch.float32,
                              device=q_g.device)
        cfg = dataclasses.replace(cfg, rel_bias_grad=d_table)
    dq, dk, dv = ulysses_backward(dout, Saved(q_g, k_g, v_g, out_g, lse_g), doc_ids, kv_heads, cfg, groups, dlse,
                                  wire_validity(key_padding))
    return dq, dk, dv, d_table if d_table.numel() == 0 else d_table.to(rel_bias.dtype)


@ulysses_attention_backward_op.register_fake
def _(dout, q_g, k_g, v_g, out_g, lse_g, dlse, kv_heads, spec, schedule, group_name, overlap, kernel, doc_ids=None,
      key_padding=None, alibi_slopes=None, rel_bias=None, rel_bias_grad=False):
    B, Hq, S_l, _ = dout.shape
    d_table = rel_bias.new_empty(rel_bias.shape) if rel_bias_grad and rel_bias is not None else q_g.new_empty(0)
    return (empty_wire((B, Hq, S_l, q_g.shape[-1]), q_g.dtype, q_g.device),
            empty_wire((B, kv_heads, S_l, k_g.shape[-1]), k_g.dtype, k_g.device),
            empty_wire((B, kv_heads, S_l, v_g.shape[-1]), v_g.dtype, v_g.device), d_table)


def _setup_context(ctx, inputs, output):
    q, k, v, spec, schedule, group_name, overlap, kernel, *rest = inputs
    doc_ids, key_padding, alibi_slopes, rel_bias = (list(rest) + [None] * 4)[:4]
    out, lse, *saved = output
    ctx.mark_non_differentiable(*saved)
    ctx.save_for_backward(*saved, doc_ids, key_padding, alibi_slopes, rel_bias)
    ctx.options = (spec, schedule, group_name, overlap, kernel)
    ctx.kv_heads = k.shape[1]
    ctx.out_shape = (out.shape, out.dtype, out.device)
    ctx.num_inputs = len(inputs)


_REL_BIAS = 11          # the op's argument index of rel_bias


def _backward(ctx, dout, dlse, *_saved_grads):
    q_g, k_g, v_g, out_g, lse_g, doc_ids, key_padding, alibi_slopes, rel_bias = ctx.saved_tensors
    if dout is None:
        shape, dtype, device = ctx.out_shape
        dout = empty_wire(shape, dtype, device, zero=True)
    table_grad = rel_bias is not None and ctx.needs_input_grad[_REL_BIAS]
    dq, dk, dv, d_table = ulysses_attention_backward_op(dout, q_g, k_g, v_g, out_g, lse_g, dlse, ctx.kv_heads,
                                                        *ctx.options, doc_ids, key_padding, alibi_slopes, rel_bias,
                                                        table_grad)
    grads = [dq, dk, dv] + [None] * (ctx.num_inputs - 3)
    if table_grad:
        grads[_REL_BIAS] = d_table
    return tuple(grads)


ulysses_attention_op.register_autograd(_backward, setup_context=_setup_context)
