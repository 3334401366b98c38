"""The sharding core's registry, walked: one ATen op at a time, run through the compiled rewrite
(a one-node FX graph, the generic rule emitting the core's plan) and through SequenceShard's
eager dispatch, on the same shards. Each case returns both placements and both errors against
the op on the full tensors."""
from __future__ import annotations

from fractions import Fraction

import torch
import torch.fx as fx

from seqpar_compiler.passes.rewrite import ShardingContext, rewrite_graph
from seqpar_compiler.runtime.layout import local_positions
from seqpar_compiler.runtime.sequence_ops import shard_sequence_op
from seqpar_compiler.runtime.sequence_shard import SequenceShard, ShardSpec, from_local, full_tensor
from seqpar_compiler.runtime.sharding.placements import Replicate, Shard

aten = torch.ops.aten
B, S, D, H = 2, 16, 8, 2
SCHEDULE = "zigzag"


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# name -> (op, args with ("shard", tensor, dim) / ("rep", tensor) / constants, kwargs)
def cases():
    x, y = _x(B, S, D), _x(B, S, D, seed=1)
    xt, yt = x.transpose(1, 2).contiguous(), y.transpose(1, 2).contiguous()       # [B, D, S]: time last
    w = _x(D, D, seed=2)
    ids = torch.randint(0, 11, (B, S), generator=torch.Generator().manual_seed(3))
    table = _x(11, D, seed=4)
    return {
        "add-shard-shard": (aten.add.Tensor, [("shard", x, 1), ("shard", y, 1)], {}),
        "mul-shard-replicated-full": (aten.mul.Tensor, [("shard", x, 1), ("rep", y)], {}),
        "mul-shard-broadcast": (aten.mul.Tensor, [("shard", x, 1), ("rep", _x(1, 1, D, seed=5))], {}),
        "mm-projection": (aten.mm.default, [("shard", x.reshape(B * S, D), 0, B), ("rep", w)], {}),
        "mm-contract-sequence": (aten.mm.default, [("shard", x[0].t().contiguous(), 1), ("shard", y[0], 0)], {}),
        "bmm-scores": (aten.bmm.default, [("shard", x, 1), ("rep", y.transpose(1, 2).contiguous())], {}),
        "sum-over-sequence": (aten.sum.dim_IntList, [("shard", x, 1), [1], False], {}),
        "mean-over-features": (aten.mean.dim, [("shard", x, 1), [-1], True], {}),
        "sum-all": (aten.sum.default, [("shard", x, 1)], {}),
        "softmax-features": (aten._softmax.default, [("shard", x, 1), -1, False], {}),
        "layer-norm": (aten.native_layer_norm.default, [("shard", x, 1), [D], ("rep", _x(D, seed=6)),
                                                         ("rep", _x(D, seed=7)), 1e-5], {}),
        "embedding": (aten.embedding.default, [("rep", table), ("shard", ids, 1)], {}),
        "view-merge-batch": (aten.view.default, [("shard", x, 1), [B * S, D]], {}),
        "view-split-heads": (aten.view.default, [("shard", x, 1), [B, S, H, D // H]], {}),
        "transpose": (aten.transpose.int, [("shard", x, 1), 0, 1], {}),
        "unsqueeze": (aten.unsqueeze.default, [("shard", x, 1), 0], {}),
        "slice-features": (aten.slice.Tensor, [("shard", x, 1), 2, 0, 4], {}),
        "select-batch": (aten.select.int, [("shard", x, 1), 0, 1], {}),
        "cumsum-features": (aten.cumsum.default, [("shard", x, 1), 2], {}),
        "index-features": (aten.index.Tensor, [("shard", x, 1), [None, None, torch.tensor([0, 3, 5])]], {}),
        "new-zeros-like-shard": (aten.new_zeros.default, [("shard", x, 1), [B, S, D]], {}),
        "new-zeros-other": (aten.new_zeros.default, [("shard", x, 1), [3, D]], {}),
        "new-ones-like-shard": (aten.new_ones.default, [("shard", x, 1), [B, S, D]], {}),
        "new-full-like-shard": (aten.new_full.default, [("shard", x, 1), [B, S, D], 2.5], {}),
        "new-empty-like-shard": (aten.new_empty.default, [("shard", x, 1), [B, S, D]], {}),
        "unsafe-view-merge": (aten._unsafe_view.default, [("shard", x, 1), [B * S, D]], {}),
        "reshape-merge": (aten.reshape.default, [("shard", x, 1), [B, S * D]], {}),
        # sizes naming the full length, made local from the output shape (GQA's repeat_kv)
        "expand-repeat-heads": (aten.expand.default, [("shard", x.view(B, 1, 1, S, D), 3), [B, H, 2, S, D]], {}),
        "expand-minus-one": (aten.expand.default, [("shard", x[:, None], 2), [B, 3, -1, D]], {}),
        "expand-merged-rows": (aten.expand.default, [("shard", x.reshape(B * S, 1, D), 0, B), [B * S, H, D]], {}),
        "mean-all": (aten.mean.default, [("shard", x, 1)], {}),
        "cat-features": (aten.cat.default, [[("shard", x, 1), ("shard", y, 1)], -1], {}),
        # elementwise ops DTensor has no strategy for, planned as mul (Llama 4's rotary table)
        "polar-rotary-table": (aten.polar.default, [("shard", x.abs(), 1), ("shard", y, 1)], {}),
        "complex-shard-broadcast": (aten.complex.default, [("shard", x, 1), ("rep", _x(1, 1, D, seed=8))], {}),
        # mixing along the sequence through an op that knows the group (a halo, a carry)
        "cumsum-sequence": (aten.cumsum.default, [("shard", x, 1), 1], {}),
        "cumprod-sequence": (aten.cumprod.default, [("shard", 1.0 + 0.1 * x.tanh(), 1), 1], {}),
        "logcumsumexp-sequence": (aten.logcumsumexp.default, [("shard", x, 1), 1], {}),
        "roll-sequence": (aten.roll.default, [("shard", x, 1), [3], [1]], {}),
        # dropout's rule (a mask per rank when it draws, test_random_ops.py); off, it must agree exactly
        "native-dropout-off": (aten.native_dropout.default, [("shard", x, 1), 0.3, False], {}),
        "flip-sequence": (aten.flip.default, [("shard", x, 1), [1]], {}),
        "pad-shift-sequence": (aten.constant_pad_nd.default, [("shard", x, 1), [0, 0, 2, -2]], {}),
        "convolution-same-length": (aten.convolution.default, [("shard", xt, 2), ("rep", _x(D, 1, 5, seed=8)),
                                                               ("rep", _x(D, seed=9)), [1], [2], [1], False, [0], D], {}),
        "convolution-backward": (aten.convolution_backward.default,
                                 [("shard", yt, 2), ("shard", xt, 2), ("rep", _x(D, D, 3, seed=10)), [D], [1], [1],
                                  [1], False, [0], 1, [True, True, True]], {}),
        "padded-conv1d-causal": (torch.ops.seqpar.padded_conv1d.default,
                                 [("shard", xt, 2), ("rep", _x(D, 1, 4, seed=11)), ("rep", _x(D, seed=12)), 3, 0, 1, D],
                                 {}),
        # refused along the sequence by both paths (gathered): the same placement, Replicate
        "cummax-sequence": (aten.cummax.default, [("shard", x, 1), 1], {}),
        "view-token-grid-zigzag": (aten.view.default, [("shard", x, 1), [B, 4, 4, D]], {}),
    }


# a token grid (rows of W = 4 positions; S/P = 8: two whole rows per rank) under a contiguous
# layout: the view that splits the sequence keeps a band of rows sharded; ops on the band and
# the view back to the sequence stay sharded. ("shard", value, dim, pre, post): post 1/4 is a band.
GRID = "ring"


def grid_cases():
    x, y = _x(B, S, D), _x(B, S, D, seed=1)
    g, g2 = x.reshape(B, 4, 4, D), y.reshape(B, 4, 4, D)
    band = Fraction(1, 4)
    return {
        "grid-view-splits-sequence-into-rows": (aten.view.default, [("shard", x, 1), [B, 4, 4, D]], {}),
        "grid-reshape-rows-times-features": (aten.reshape.default, [("shard", x, 1), [B, 4, 4 * D]], {}),
        "grid-view-rows-back-to-sequence": (aten.view.default, [("shard", g, 1, 1, band), [B, S, D]], {}),
        "grid-add-bands": (aten.add.Tensor, [("shard", g, 1, 1, band), ("shard", g2, 1, 1, band)], {}),
        "grid-mul-replicated-grid": (aten.mul.Tensor, [("shard", g, 1, 1, band), ("rep", g2[0])], {}),
        "grid-permute-channels-first": (aten.permute.default, [("shard", g, 1, 1, band), [0, 3, 1, 2]], {}),
        "grid-sum-over-rows": (aten.sum.dim_IntList, [("shard", g, 1, 1, band), [1], False], {}),
    }


# a part of the sequence: positions [3, 13) of S = 16 (zigzag on 2 ranks: 2 rows on rank 0, 8 on
# rank 1; on 4 ranks some hold none)
PART = (3, 13)


def part_cases():
    """Ops on a part of the sequence (a chunk, ``("part", value of the chunk, dim)``): the core
    plans them with the part's local length on both paths; a scan along it is refused on both."""
    L = PART[1] - PART[0]
    x, y = _x(B, L, D), _x(B, L, D, seed=1)
    w, b = _x(D, seed=2), _x(D, seed=3)
    idx = torch.randint(0, D, (B, L, 1), generator=torch.Generator().manual_seed(4))
    return {
        "part-add-replicated": (aten.add.Tensor, [("part", x, 1), ("rep", y)], {}),
        "part-mul-parts": (aten.mul.Tensor, [("part", x, 1), ("part", y, 1)], {}),
        "part-log-softmax": (aten._log_softmax.default, [("part", x, 1), -1, False], {}),
        "part-layer-norm": (aten.native_layer_norm.default, [("part", x, 1), [D], ("rep", w), ("rep", b), 1e-5], {}),
        "part-view-merges-batch": (aten.view.default, [("part", x, 1), [B * L, D]], {}),
        "part-mm-weight": (aten.mm.default, [("part", x.reshape(B * L, D), 0, B), ("rep", w.repeat(D, 1))], {}),
        "part-sum-over-sequence": (aten.sum.dim_IntList, [("part", x, 1), [1]], {}),
        "part-gather-features": (aten.gather.default, [("part", x, 1), -1, ("part", idx, 1)], {}),
        "part-tanh": (aten.tanh.default, [("part", x, 1)], {}),
        "part-cumsum-refused": (aten.cumsum.default, [("part", x, 1), 1], {}),
    }


def _spec(dim, pre=1, post=1, schedule=SCHEDULE, part=None):
    return ShardSpec(dim, S, schedule, "0", pre=pre, post=post, part=part)


def _part_local(t, dim, pre=1):
    from seqpar_compiler.runtime.sequence_shard import slice_local
    return slice_local(t, _spec(dim, pre, part=PART))


def _placed(spec_or_pl) -> object:
    """A shard's placement as the compiled rewrite writes it: a part is a SeqRange."""
    from seqpar_compiler.runtime.sharding.placements import SeqRange
    s = spec_or_pl
    if s.part is not None:
        return SeqRange(s.dim, s.pre, s.post, *s.part)
    return Shard(s.dim, s.pre, s.post)


def _local(t, dim, pre=1, post=1, schedule=SCHEDULE):
    if post != 1:               # a band of rows: the contiguous layout of the rows
        return shard_sequence_op(t, dim, schedule, "0")
    if pre == 1:
        return shard_sequence_op(t, dim, schedule, "0")
    shape = list(t.shape)
    split = shape[:dim] + [pre, S] + shape[dim + 1:]
    local = shard_sequence_op(t.reshape(split), dim + 1, schedule, "0")
    return local.reshape(shape[:dim] + [-1] + shape[dim + 1:])


def _map_args(args, leaf):
    out = []
    for a in args:
        if isinstance(a, list) and a and isinstance(a[0], tuple) and a[0] and a[0][0] in ("shard", "rep"):
            out.append([leaf(x) for x in a])
        elif isinstance(a, tuple) and a and a[0] in ("shard", "rep", "part"):
            out.append(leaf(a))
        else:
            out.append(a)
    return out


def _eager(op, args, schedule=SCHEDULE):
    def leaf(a):
        if a[0] == "part":
            pre = a[3] if len(a) > 3 else 1
            return from_local(_part_local(a[1], a[2], pre), _spec(a[2], pre, part=PART))
        if a[0] == "shard":
            pre, post = (a[3] if len(a) > 3 else 1), (a[4] if len(a) > 4 else 1)
            return from_local(_local(a[1], a[2], pre, post, schedule), _spec(a[2], pre, post, schedule))
        return a[1]
    out = op(*_map_args(args, leaf))
    first = out[0] if isinstance(out, (tuple, list)) else out
    placement = _placed(first.spec) if isinstance(first, SequenceShard) else Replicate()
    return full_tensor(first), placement


def _compiled(op, args, rank, P, schedule=SCHEDULE):
    """``op`` as a one-node graph through the rewrite: its first output's placement and value."""
    graph = fx.Graph()
    leaves, local_inputs, preset = [], [], {}

    def leaf(a):
        node = graph.placeholder(f"in{len(leaves)}")
        node.meta["example_value"] = a[1]
        leaves.append((node, a))
        if a[0] == "part":
            pre = a[3] if len(a) > 3 else 1
            preset[node] = _placed(_spec(a[2], pre, part=PART))
            local_inputs.append(_part_local(a[1], a[2], pre))
        elif a[0] == "shard":
            pre, post = (a[3] if len(a) > 3 else 1), (a[4] if len(a) > 4 else 1)
            preset[node] = Shard(a[2], pre, post)
            local_inputs.append(_local(a[1], a[2], pre, post, schedule))
        else:
            local_inputs.append(a[1])
        return node
    call_args = _map_args(args, leaf)
    node = graph.call_function(op, tuple(call_args))
    node.meta["example_value"] = op(*_map_args(args, lambda a: a[1]))
    first = graph.call_function(__import__("operator").getitem, (node, 0)) if isinstance(
        node.meta["example_value"], (tuple, list)) else node
    if first is not node:
        first.meta["example_value"] = node.meta["example_value"][0]
    on_part = any(a[0] == "part" for _, a in leaves)
    if on_part:          # a part leaving the frame is gathered there: read its placement one op before
        last = graph.call_function(aten.alias.default, (first,))
        last.meta["example_value"] = first.meta["example_value"]
        graph.output(last)
    else:
        graph.output(first)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    ctx = ShardingContext(S=S, P=P, rank=rank, schedule=schedule, group_name="0", fallback="gather",
                          output="local", kernel="auto", overlap=False)
    ctx.place.update(preset)
    out_gm = rewrite_graph(gm, [a[1] for _, a in leaves], ctx, {})
    placement = ctx.place.get(first, Replicate())
    local = out_gm(*local_inputs)
    from seqpar_compiler.runtime.sharding.placements import SeqRange
    if on_part:
        value = local                                 # the whole value, gathered at the exit
    elif isinstance(placement, SeqRange):
        value = full_tensor(from_local(local, _spec(placement.dim, placement.pre, placement.post,
                                                    part=(placement.start, placement.stop))))
    elif isinstance(placement, Shard):
        value = full_tensor(from_local(local, _spec(placement.dim, placement.pre, placement.post, schedule)))
    else:
        value = local
    return value, placement


# ops whose values are unspecified (uninitialised memory): only shape and placement compare
SHAPE_ONLY = {"new-empty-like-shard"}


def run_registry(rank: int, P: int) -> dict:
    out = {}
    walk = [(name, case, SCHEDULE) for name, case in cases().items()]
    walk += [(name, case, GRID) for name, case in grid_cases().items()]
    walk += [(name, case, SCHEDULE) for name, case in part_cases().items()]
    for name, (op, args, _), schedule in walk:
        ref = op(*_map_args(args, lambda a: a[1]))
        ref = ref[0] if isinstance(ref, (tuple, list)) else ref
        try:
            e_val, e_pl = _eager(op, args, schedule)
            c_val, c_pl = _compiled(op, args, rank, P, schedule)
            if name in SHAPE_ONLY:
                rel = lambda v: 0.0 if v.shape == ref.shape else float("inf")  # noqa: E731
            else:
                rel = lambda v: float((v.double() - ref.double()).norm() / max(ref.double().norm(), 1e-30))  # noqa: E731
            out[name] = {"eager": str(e_pl), "compiled": str(c_pl), "eager_err": rel(e_val),
                         "compiled_err": rel(c_val)}
        except Exception as err:  # noqa: BLE001 - reported per case
            out[name] = {"error": f"{type(err).__name__}: {err}"}
    return out
