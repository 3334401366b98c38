"""Recognise the two ways models write a padded convolution over time, as one op.

Reads a Dynamo graph (``node.meta["example_value"]``); rewrites in place, before the placements
are decided, each match into one ``seqpar::padded_conv1d(x, w, b, left, right, dilation, groups)``
node (``runtime/sequence_mixing.py``), whose sharding rule is a halo exchange:

  * ``conv1d(F.pad(x, (l, r)), w, b)``: the pad's only users are unpadded stride-1 convolutions;
  * ``conv1d(x, w, b, padding=p)[..., :L]`` with L the input's length (``nn.Conv1d(padding=k−1)``
    then a slice, as HF Mamba2, Bamba and Falcon-H1 write the causal depthwise convolution):
    every user of the convolution takes the first L positions of the last dim, which is
    ``padded_conv1d`` with ``left = p`` and ``right = d·(k−1) − p`` (0 for the causal p = d·(k−1)):
    the slice drops exactly the outputs that the extra right padding made.

Why here and not in the sharding core: each half alone changes the sequence's length (a pad to
S+k−1, a convolution to S+k−1, a slice back to S), which no placement can carry; together they
keep it, and only the graph sees them together. The rewrite is exact in one process too (the op
computes the same values), so a graph that ends up replicated runs it unchanged.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["fuse_padded_convolutions"]

_CONV1D = {torch.conv1d, F.conv1d}
_PAD = {F.pad, torch._C._nn.pad, torch.constant_pad_nd}
_padded_conv1d = torch.ops.seqpar.padded_conv1d.default


def _conv_args(node: fx.Node):
    """(x, weight, bias, stride, padding, dilation, groups) of a ``conv1d`` call, ints unwrapped."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    got = dict(zip(names, node.args))
    got.update(node.kwargs)
    vals = [got.get(n, defaults.get(n)) for n in names]
    for i in (3, 4, 5):
        v = vals[i]
        if isinstance(v, (list, tuple)):
            if len(v) != 1:
                return None
            v = v[0]
        if not isinstance(v, int):
            return None               # "same"/"valid" or a symbolic value
        vals[i] = v
    return vals


def _example(node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _takes_first(user: fx.Node, length: int) -> bool:
    """``user`` is ``conv[..., :length]`` (or ``[:, :, :length]`` on a 3-D value)."""
    if user.op != "call_function" or user.target is not operator.getitem:
        return False
    index = user.args[1]
    if not isinstance(index, tuple):
        return False
    *lead, last = index
    full = slice(None, None, None)
    ok_lead = lead == [Ellipsis] or (len(lead) == _example(user.args[0]).dim() - 1 and all(i == full for i in lead))
    return ok_lead and isinstance(last, slice) and last.start in (None, 0) and last.step in (None, 1) \
        and last.stop == length


def _replace(gm: fx.GraphModule, at: fx.Node, old: fx.Node, x, w, b, left, right, dilation, groups) -> None:
    with gm.graph.inserting_before(at):
        new = gm.graph.call_function(_padded_conv1d, (x, w, b, left, right, dilation, groups))
    new.meta.update(old.meta)
    old.replace_all_uses_with(new)


def fuse_padded_convolutions(gm: fx.GraphModule) -> int:
    """Rewrite every match (module docstring); returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _CONV1D:
            continue
        args = _conv_args(node)
        if args is None:
            continue
        x, w, b, stride, padding, dilation, groups = args
        xv, wv = _example(x), _example(w)
        if stride != 1 or not isinstance(xv, torch.Tensor) or not isinstance(wv, torch.Tensor) or xv.dim() not in (2, 3):
            continue
        if padding == 0 and x.op == "call_function" and x.target in _PAD and len(x.users) == 1:
            pad = _pad_last_dim(x)
            if pad is not None:
                _replace(gm, node, node, x.args[0], w, b, pad[0], pad[1], dilation, groups)
                gm.graph.erase_node(node)
                gm.graph.erase_node(x)
                count += 1
            continue
        reach = dilation * (wv.shape[-1] - 1)
        length = xv.shape[-1]
        if 0 < padding and reach <= 2 * padding and padding <= reach and node.users \
                and all(_takes_first(u, length) for u in node.users):
            for user in list(node.users):
                _replace(gm, user, user, x, w, b, padding, reach - padding, dilation, groups)
                gm.graph.erase_node(user)
            gm.graph.erase_node(node)
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _pad_last_dim(pad: fx.Node):
    """(left, right) of a constant zero pad of the last dim only; None for any other pad."""
    args = list(pad.args) + [None] * 4
    widths = pad.kwargs.get("pad", args[1])
    mode = pad.kwargs.get("mode", args[2] if pad.target is not torch.constant_pad_nd else "constant")
    value = pad.kwargs.get("value", args[3] if pad.target is not torch.constant_pad_nd else args[2])
    if not isinstance(widths, (list, tuple)) or len(widths) != 2 or not all(isinstance(v, int) for v in widths):
        return None
    if mode not in (None, "constant") or value not in (None, 0, 0.0) or min(widths) < 0:
        return None
    return widths[0], widths[1]
