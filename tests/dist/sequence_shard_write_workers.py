"""Eager writes into SequenceShards and their views, on spawned ranks: each case does the same
writes on a SequenceShard (via ``from_local``) and on the plain full tensor, and returns the
relative error of the values read back, or the error message where seqpar must refuse."""
from __future__ import annotations

import torch

from seqpar_compiler.runtime.sequence_ops import shard_sequence_op
from seqpar_compiler.runtime.sequence_shard import ShardSpec, SequenceShard, from_local, full_tensor

B, S, D = 2, 16, 8


def _pair(P):
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(3))
    spec = ShardSpec(1, S, "zigzag", "0")
    return from_local(shard_sequence_op(x, 1, "zigzag", "0"), spec), x.clone()


def _rel(a, b) -> float:
    a = full_tensor(a) if isinstance(a, SequenceShard) else a
    a = a._full if hasattr(a, "_full") else a
    return float((a.double() - b.double()).norm() / b.double().norm())


def _feature_slice_write(s):
    s[..., :4].mul_(2.0)
    return s


def _setitem_features(s):
    s[:, :, 4:] = 1.5
    return s


def _in_place_scan(s):
    s.cumsum_(1)
    return s


def _out_variant(s):
    torch.add(s, 1.0, out=s)
    return s


WRITES = {"feature_slice_write": _feature_slice_write, "setitem_features": _setitem_features,
          "in_place_scan": _in_place_scan, "out_variant": _out_variant}


def write_cases(rank: int, P: int) -> dict:
    out = {}
    with torch.no_grad():
        for name, fn in WRITES.items():
            s, x = _pair(P)
            out[name] = _rel(fn(s), fn(x))
        # a write into a plain tensor from a shard lands in the plain tensor
        s, x = _pair(P)
        plain, ref = torch.ones(B, S, D), torch.ones(B, S, D)
        plain.add_(s)
        ref.add_(x)
        out["plain_add_shard"] = _rel(plain, ref)
        plain, ref = torch.zeros(B, S, D), torch.zeros(B, S, D)
        plain.copy_(s)
        ref.copy_(x)
        out["plain_copy_shard"] = _rel(plain, ref)
        # reads of a sequence-picking view stay right
        s, x = _pair(P)
        out["read_last_position"] = _rel(s[:, -1], x[:, -1])
        out["read_split_view"] = _rel(s.view(B, S // 4, 4, D)[:, :, 0], x.view(B, S // 4, 4, D)[:, :, 0])
        # writes through such a view, and reads after the shard changed, are refused
        for name, fn in {"write_into_position": lambda s: s[:, 3].add_(1.0),
                         "write_into_split_view": lambda s: s.view(B, S // 4, 4, D)[:, :, 0].mul_(2.0),
                         "stale_view_read": lambda s: (lambda v: (s.add_(1.0), v.sum()))(s[:, 3])}.items():
            s, _ = _pair(P)
            try:
                fn(s)
                out[name] = "no error"
            except RuntimeError as err:
                out[name] = str(err)
    return out
