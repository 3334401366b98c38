"""Sequence-mixing ops (convolutions over time, rolls, flips, scans) on spawned ranks, against one
process's eager run in float64.

Compiled: a small block (a linear seeding the shard, causal attention so the frame is sharded,
and the mixing op on the sharded activation), compiled with ``aot_eager`` under seqpar; loss,
output and every gradient are compared with the same module run eagerly in one process.
Eager: the op on a ``SequenceShard`` (``from_local`` of this rank's part), forward and backward.
Each case returns relative errors ``||out − ref|| / ||ref||`` and the seqpar warnings it raised.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import seqpar_compiler as sp
from step_probes import SequenceGatherCounter, full_length_saves
from seqpar_compiler.runtime.sequence_ops import shard_sequence_op
from seqpar_compiler.runtime import sequence_shard
from seqpar_compiler.runtime.sequence_shard import SequenceShard, ShardSpec, from_local, full_tensor, gather_count

B, D, H = 3, 8, 2      # B·S/P never equals S (the full-length probe reads shapes)


def _rel(a, b) -> float:
    a = full_tensor(a) if isinstance(a, SequenceShard) else a
    b = b.double()
    n = float(b.norm())
    return float((a.double() - b).norm()) / (n if n else 1.0)


# -- mixing ops on [B, S, D] -----------------------------------------------------------------------
class _CausalConvPad(nn.Module):
    """Left padding then an unpadded conv1d (depthwise unless ``groups`` says otherwise)."""

    def __init__(self, k=4, groups=D, dilation=1):
        super().__init__()
        self.conv = nn.Conv1d(D, D, k, groups=groups, dilation=dilation, bias=True)
        self.reach = dilation * (k - 1)

    def forward(self, h):
        return self.conv(F.pad(h.transpose(1, 2), (self.reach, 0))).transpose(1, 2)


class _CausalConvSlice(nn.Module):
    """``nn.Conv1d(padding=k−1)`` then ``[..., :S]`` (HF Mamba2 / Bamba / Falcon-H1)."""

    def __init__(self, k=4, groups=D):
        super().__init__()
        self.conv = nn.Conv1d(D, D, k, groups=groups, padding=k - 1)

    def forward(self, h):
        return self.conv(h.transpose(1, 2))[..., :h.shape[1]].transpose(1, 2)


class _SameConv(nn.Module):
    """A centred ("same") convolution: a halo on both sides."""

    def __init__(self, k=5):
        super().__init__()
        self.conv = nn.Conv1d(D, D, k, padding=k // 2)

    def forward(self, h):
        return self.conv(h.transpose(1, 2)).transpose(1, 2)


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return self.fn(h)


def _positive(h):
    return 1.0 + 0.25 * torch.tanh(h)


MIXERS = {
    "causal_conv_pad_depthwise": lambda: _CausalConvPad(),
    "causal_conv_pad_dense": lambda: _CausalConvPad(k=3, groups=1),
    "causal_conv_pad_dilated": lambda: _CausalConvPad(k=3, dilation=2),
    "causal_conv_pad_wide": lambda: _CausalConvPad(k=8),       # a halo longer than a zigzag run
    "causal_conv_slice_depthwise": lambda: _CausalConvSlice(),
    "causal_conv_slice_dense": lambda: _CausalConvSlice(k=3, groups=1),
    "same_conv": lambda: _SameConv(),
    "roll_forward": lambda: _Fn(lambda h: torch.roll(h, 3, 1)),
    "roll_backward": lambda: _Fn(lambda h: torch.roll(h, -2, 1)),
    "flip": lambda: _Fn(lambda h: torch.flip(h, [1])),
    "token_shift": lambda: nn.ZeroPad2d((0, 0, 1, -1)),        # RWKV's time shift: zero fill
    "cumsum": lambda: _Fn(lambda h: h.cumsum(1)),
    "cumprod": lambda: _Fn(lambda h: _positive(h).cumprod(1)),
    "logcumsumexp": lambda: _Fn(lambda h: torch.logcumsumexp(h, 1)),
}


class _Block(nn.Module):
    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.mixer = mixer

    def forward(self, x):
        h = self.inp(x)
        q, k, v = self.qkv(h).view(x.shape[0], x.shape[1], 3, H, D // H).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)
        return a + self.mixer(h)


def _seqpar_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "seqpar" in str(w.message)]


def compiled_case(rank: int, P: int, name: str, schedule: str, S: int) -> dict:
    torch.manual_seed(0)
    model = _Block(MIXERS[name]()).double()
    ref_model = copy.deepcopy(model)
    x = torch.randn(B, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(B, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = ref_model(x)
    (ref * w).sum().backward()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=sp.backend(inner="aot_eager", schedule=schedule))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x)                                   # compile outside the probes

        def step():
            out = compiled(x)                         # a SequenceShard: the loss reads this rank's rows
            (out * w).sum().backward()
            return out
        model.zero_grad()
        with SequenceGatherCounter() as gathers:
            saves, out = full_length_saves(step, [x, w], S)
    grads = {n: _rel(p.grad, rp.grad) for (n, p), rp in zip(model.named_parameters(), ref_model.parameters())}
    return {"out": _rel(out, ref), "grad": max(grads.values()), "warnings": _seqpar_warnings(caught),
            "full_length_saves": saves, "sequence_gathers": gathers.calls}


EAGER_OPS = {
    "roll_forward": lambda s: torch.roll(s, 3, 1),
    "roll_backward": lambda s: torch.roll(s, -2, 1),
    "flip": lambda s: torch.flip(s, [1]),
    "token_shift": lambda s: F.pad(s, (0, 0, 1, -1)),
    "cumsum": lambda s: s.cumsum(1),
    "cumprod": lambda s: _positive(s).cumprod(1),
    "logcumsumexp": lambda s: torch.logcumsumexp(s, 1),
    "same_conv": lambda s: F.conv1d(s.transpose(1, 2), _EAGER_W, padding=2).transpose(1, 2),
}
_EAGER_W = torch.randn(D, D, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))


def eager_case(rank: int, P: int, name: str, schedule: str, S: int) -> dict:
    x = torch.randn(B, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(B, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xr = x.clone().requires_grad_(True)
    ref = EAGER_OPS[name](xr)
    (ref * w).sum().backward()
    xs = x.clone().requires_grad_(True)
    sequence_shard._gather_warned.clear()          # each case says its own fallbacks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = from_local(shard_sequence_op(xs, 1, schedule, "0"), ShardSpec(1, S, schedule, "0"))
        before = gather_count()
        out = EAGER_OPS[name](s)
        sharded = isinstance(out, SequenceShard)
        (out * w).sum().backward()
        gathers = gather_count() - before
    return {"out": _rel(out, ref), "grad": _rel(xs.grad, xr.grad), "sharded": sharded, "gathers": gathers,
            "warnings": _seqpar_warnings(caught)}


def run_cases(rank: int, P: int, cases: list) -> dict:
    out = {}
    for kind, name, schedule, S in cases:
        fn = compiled_case if kind == "compiled" else eager_case
        try:
            out[(kind, name, schedule, S)] = fn(rank, P, name, schedule, S)
        except Exception as err:  # noqa: BLE001 - reported per case, so one failure does not hide the rest
            out[(kind, name, schedule, S)] = {"error": f"{type(err).__name__}: {err}"}
    return out
