"""A linear recurrence over the sequence run across ranks by passing its boundary state:
the op pair ``seqpar::carried_recurrence`` → out and ``seqpar::carried_recurrence_backward`` →
gradients, placed in graphs by ``passes/recurrences.py``.

A *recurrence body* is a function of this rank's contiguous part of the sequence and of the
state carried into it, ``body(*inputs, h0) -> (out, hT)``, affine in ``h0`` (the pass proves it).
Rank r receives ``h0`` from rank r−1 (rank 0 starts from zeros, as the model does), runs the body
on its own tokens and sends ``hT`` to rank r+1. The backward runs the chain the other way:
``dhT`` from rank r+1, the body's vector-Jacobian product (recomputed from the saved local
inputs and ``h0``), ``dh0`` to rank r−1. Being one opaque op pair, the partitioner can save only
the local inputs and the state: nothing of the recurrence is full length.

Why sequential over the ranks (and not a parallel prefix of (decay, state) pairs): the carried
state's transition ``A`` is only known as a function (a Mamba-2 decay per head, a DeltaNet
product of Householder-like factors, whatever the model wrote); making it explicit costs a
state×state matrix per rank. The state is small (B·H·D·N), so each hop is one small message,
and the body's work that does not depend on ``h0`` is most of it.

Shape legend: inputs are this rank's shards (sequence length S/P on their sequence dim) or
replicated values; h0, hT: the body's state shape (e.g. Mamba-2's ``[B, 1, H, D, N]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["RecurrenceBody", "register_body", "body_of", "carried_recurrence_op",
           "carried_recurrence_backward_op", "run_chain"]

_TAG = 7919           # p2p tag of the state messages (the ring's tags are below 32·steps)


@dataclass(frozen=True)
class RecurrenceBody:
    """What the op runs: ``fn(*inputs, h0) -> (out, hT)`` on local values, the state's
    shape and dtype (``h0`` of rank 0 is zeros of it)."""

    fn: Callable
    state_shape: tuple
    state_dtype: torch.dtype


_BODIES: dict[str, RecurrenceBody] = {}


def register_body(key: str, body: RecurrenceBody) -> str:
    """Make ``body`` callable by name from graphs (an op takes strings, not functions)."""
    _BODIES[key] = body
    return key


def body_of(key: str) -> RecurrenceBody:
    return _BODIES[key]


def _group(group_name: str):
    if not group_name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group
    group = _resolve_process_group(group_name)
    return None if dist.get_world_size(group) == 1 else group


def _neighbours(group):
    r, P = dist.get_rank(group), dist.get_world_size(group)
    prev = dist.get_global_rank(group, r - 1) if r > 0 else None
    nxt = dist.get_global_rank(group, r + 1) if r < P - 1 else None
    return prev, nxt


def _staged(t: Tensor, group) -> bool:
    """gloo moves no CUDA tensors: the state then travels through host memory (it is small)."""
    return t.device.type != "cpu" and "nccl" not in str(dist.get_backend(group))


def _recv(like: Tensor, src: int, group) -> Tensor:
    device = "cpu" if _staged(like, group) else like.device
    buf = torch.empty(like.shape, dtype=like.dtype, device=device)
    dist.recv(buf, src=src, group=group, tag=_TAG)
    return buf.to(like.device)


def _send(t: Tensor, dst: int, group) -> None:
    t = t.detach().contiguous()
    dist.send(t.cpu() if _staged(t, group) else t, dst=dst, group=group, tag=_TAG)


def _zeros_state(body: RecurrenceBody, like: Tensor) -> Tensor:
    return torch.zeros(body.state_shape, dtype=body.state_dtype, device=like.device)


def _autograd_inside_op():
    """Autograd back on inside an op's body: a custom op runs with autograd's dispatch keys
    excluded, so a body differentiated there would record nothing. (``torch.func.vjp`` would
    not need this but refuses to run under the user's saved-tensor hooks.)"""
    K = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (K.AutogradFunctionality, K.ADInplaceOrView):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op("seqpar::carried_recurrence", mutates_args=())
def carried_recurrence_op(inputs: list[Tensor], key: str, group_name: str) -> tuple[Tensor, Tensor]:
    """(out, h0): this rank's output and the state it received (saved for the backward)."""
    body, group = body_of(key), _group(group_name)
    h0 = _zeros_state(body, inputs[0])
    prev, nxt = _neighbours(group) if group is not None else (None, None)
    if prev is not None:
        h0 = _recv(h0, prev, group)
    out, hT = body.fn(*inputs, h0)
    if nxt is not None:
        _send(hT, nxt, group)
    return out.contiguous(), h0


@carried_recurrence_op.register_fake
def _(inputs, key, group_name):
    body = body_of(key)
    h0 = inputs[0].new_empty(body.state_shape, dtype=body.state_dtype)
    out, _ = body.fn(*inputs, h0)
    return torch.empty_like(out, memory_format=torch.contiguous_format), h0


@torch.library.custom_op("seqpar::carried_recurrence_backward", mutates_args=())
def carried_recurrence_backward_op(inputs: list[Tensor], h0: Tensor, dout: Tensor, key: str,
                                   group_name: str) -> list[Tensor]:
    """Gradients of the inputs; ``dh0`` goes to the previous rank, ``dhT`` comes from the next."""
    body, group = body_of(key), _group(group_name)
    prev, nxt = _neighbours(group) if group is not None else (None, None)
    with _autograd_inside_op(), torch.enable_grad():
        xs = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
        h = h0.detach().requires_grad_(True)
        out, hT = body.fn(*xs, h)
        dhT = _recv(hT, nxt, group) if nxt is not None else torch.zeros_like(hT)
        wrt = [x for x in xs if x.requires_grad] + [h]
        found = torch.autograd.grad([out, hT], wrt, [dout, dhT], allow_unused=True)
    found = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, found)]
    dh0, it = found[-1], iter(found[:-1])
    # laid out like the inputs, as the fake says (the partitioner plans views on these strides)
    grads = [torch.empty_like(x).copy_(next(it)) if x.requires_grad else torch.zeros_like(x) for x in xs]
    if prev is not None:
        _send(dh0, prev, group)
    return grads


@carried_recurrence_backward_op.register_fake
def _(inputs, h0, dout, key, group_name):
    return [torch.empty_like(x) for x in inputs]


def _setup_context(ctx, inputs, output):
    xs, key, group_name = inputs
    ctx.save_for_backward(*xs, output[1])
    ctx.options = (key, group_name)


def _backward(ctx, dout, dh0):
    *xs, h0 = ctx.saved_tensors
    grads = carried_recurrence_backward_op(list(xs), h0, dout.contiguous(), *ctx.options)
    return list(grads), None, None


carried_recurrence_op.register_autograd(_backward, setup_context=_setup_context)


def run_chain(fn: Callable, parts: list[list[Tensor]], h0: Tensor) -> tuple[list[Tensor], Tensor]:
    """The chain in one process: ``fn`` over ``parts`` in order, each from the previous state
    (what P ranks compute together; used to prove a body before it is trusted)."""
    outs, h = [], h0
    for xs in parts:
        out, h = fn(*xs, h)
        outs.append(out)
    return outs, h
