"""Eager MoE routing on SequenceShards (no compiler), float64, on spawned ranks: each case runs
the same experts code on a shard of the flattened tokens and on the plain tensor, forward and
backward, and returns ||out-ref||/||ref|| for the output and every gradient, the seqpar warnings
and the types the token lists had."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from seqpar_compiler.runtime.sequence_ops import shard_sequence_op
from seqpar_compiler.runtime.sequence_shard import SequenceShard, ShardSpec, from_local, full_tensor

B, S, D, E, K, I = 2, 16, 8, 4, 2, 12
seen: list = []            # the types of the token lists each case met


def _route(flat, router):
    """top-k routing of [B·S, D] tokens: weights [B·S, K], expert ids [B·S, K] (per token)."""
    weights, experts = torch.topk(F.softmax(flat @ router.t(), -1), K, dim=-1)
    return weights / weights.sum(-1, keepdim=True), experts


def eager_experts(flat, experts, weights, up, down):
    """transformers' ``experts_implementation="eager"`` loop (Mixtral, Qwen3-MoE, DeepSeek-V3)."""
    out = torch.zeros_like(flat)
    with torch.no_grad():
        mask = F.one_hot(experts, num_classes=E + 1).permute(2, 1, 0)          # [E+1, K, B·S]
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = e[0]
        if e == E:
            continue
        slot, token = torch.where(mask[e])
        seen.append(type(token).__name__)
        gate, val = F.linear(flat[token], up[e]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * val, down[e]) * weights[token, slot, None]
        out.index_add_(0, token, h.to(out.dtype))
    return out


def capacity_limited_experts(flat, experts, weights, up, down, capacity=5):
    """Each expert keeps its first ``capacity`` entries in the one-process order: which tokens
    are dropped depends on every rank's tokens, so it must not run on a rank's own."""
    out = torch.zeros_like(flat)
    with torch.no_grad():
        mask = F.one_hot(experts, num_classes=E).permute(2, 1, 0)
    for e in range(E):
        slot, token = torch.where(mask[e])
        slot, token = slot[:capacity], token[:capacity]
        gate, val = F.linear(flat[token], up[e]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * val, down[e]) * weights[token, slot, None]
        out.index_add_(0, token, h)
    return out


def aux_loss(router_logits, experts):
    """Switch-style load balancing (transformers' ``load_balancing_loss_func``): sums over every token."""
    counts = torch.histc(experts.reshape(-1).to(router_logits.dtype), bins=E, min=0, max=E)
    probs = F.softmax(router_logits, -1).sum(0)
    n = router_logits.shape[0]
    return E * (counts / n * probs / n).sum()


def _step(x, params, experts_fn, with_aux):
    router, up, down = params
    flat = x.reshape(-1, x.shape[-1])
    weights, experts = _route(flat, router)
    out = experts_fn(flat, experts, weights, up, down)
    loss = (out.view(x.shape) + x).pow(2).mean()
    if with_aux:
        loss = loss + aux_loss(flat @ router.t(), experts)
    return out, loss


def _rel(a, b) -> float:
    a = full_tensor(a) if isinstance(a, SequenceShard) else a
    return float((a - b).norm() / b.norm())


def _case(experts_fn, with_aux, D=D):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    params = [torch.randn(E, D, generator=g, dtype=torch.float64),
              torch.randn(E, 2 * I, D, generator=g, dtype=torch.float64) * 0.3,
              torch.randn(E, D, I, generator=g, dtype=torch.float64) * 0.3]
    ref_params = [p.clone().requires_grad_() for p in params]
    ref_x = x.clone().requires_grad_()
    ref_out, ref_loss = _step(ref_x, ref_params, experts_fn, with_aux)
    ref_loss.backward()

    sp_params = [p.clone().requires_grad_() for p in params]
    local = shard_sequence_op(x, 1, "zigzag", "0").clone().requires_grad_()
    shard = from_local(local, ShardSpec(1, S, "zigzag", "0"))
    seen.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, loss = _step(shard, sp_params, experts_fn, with_aux)
        loss.backward()
    grad_x = full_tensor(from_local(local.grad, ShardSpec(1, S, "zigzag", "0")))
    errors = {"out": _rel(out, ref_out), "loss": _rel(loss, ref_loss), "x": _rel(grad_x, ref_x.grad)}
    errors.update({f"param{i}": _rel(p.grad, q.grad) for i, (p, q) in enumerate(zip(sp_params, ref_params))})
    return {"errors": errors, "token_types": sorted(set(seen)),
            "warnings": [str(w.message) for w in caught if "seqpar" in str(w.message)]}


CASES = {"eager_experts": (eager_experts, False), "eager_experts_aux_loss": (eager_experts, True),
         "capacity_limited": (capacity_limited_experts, False),
         # the width equals the number of tokens B·S (transformers' tiny configs: 64 = 2 x 32): the
         # gradient buffer of flat[token] is [B·S, B·S], and only its first dim is the tokens'
         "eager_experts_width_is_token_count": (eager_experts, True, B * S)}


def run_cases(rank: int, P: int, names: list[str]) -> dict:
    return {name: _case(*CASES[name]) for name in names}
