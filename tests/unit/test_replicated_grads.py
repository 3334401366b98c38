"""passes/replicated_grads.py alone, on hand-built graphs (issue 13, GRAD_REDUCE=none): a
gradient ÷ P goes exactly on the edges from a purely replicated value that needs a gradient into
a replicated value computed from shards."""
import operator

import torch
import torch.fx as fx

from seqpar_compiler.passes.placement import Replicate, Shard
from seqpar_compiler.passes.replicated_grads import share_replicated_gradients
from seqpar_compiler.runtime.grad_share import share_grad_over_group


def _graph(extra_use: bool):
    """x: this rank's tokens (Shard), w: a parameter, loss = sum(x · w) all-reduced (+ w·w)."""
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    x.meta.update(example_value=torch.zeros(2, 4), seqpar_placement=Shard(0))
    w.meta.update(example_value=torch.zeros(4, requires_grad=True), seqpar_placement=Replicate())
    xw = g.call_function(operator.mul, (x, w))
    xw.meta["seqpar_placement"] = Shard(0)
    loss = g.call_function(torch.sum, (xw,))
    loss.meta["seqpar_placement"] = Replicate()          # stands for the all-reduced loss
    if extra_use:
        ww = g.call_function(operator.mul, (w, w))
        ww.meta["seqpar_placement"] = Replicate()
        reg = g.call_function(torch.sum, (ww,))
        reg.meta["seqpar_placement"] = Replicate()
        loss = g.call_function(operator.add, (loss, reg))
        loss.meta["seqpar_placement"] = Replicate()
    g.output(loss)
    return fx.GraphModule(torch.nn.Module(), g)


def _shares(gm):
    return [n for n in gm.graph.nodes if n.target is share_grad_over_group]


def test_a_parameter_that_only_meets_shards_gets_no_division():
    gm = _graph(extra_use=False)
    assert share_replicated_gradients(gm, "g") == 0 and _shares(gm) == []


def test_a_replicated_term_added_to_the_loss_is_divided_once_on_that_edge():
    gm = _graph(extra_use=True)
    assert share_replicated_gradients(gm, "g") == 1
    (share,) = _shares(gm)
    assert share.args[0].name == "sum_2"                     # the replicated term w·w, not w itself
    assert [u.target for u in share.users] == [operator.add]
    # w's use by the shards (x · w) is untouched: that gradient is partial already
    mul = next(n for n in gm.graph.nodes if n.name == "mul")
    assert [a.name for a in mul.args] == ["x", "w"]


def test_share_grad_divides_the_gradient_by_the_group_size(monkeypatch):
    import seqpar_compiler.runtime.grad_share as gs
    monkeypatch.setattr(gs.torch.distributed, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(gs, "resolve_group", lambda name: None)
    w = torch.ones(3, requires_grad=True)
    share_grad_over_group(w * 2, "g").sum().backward()
    assert torch.equal(w.grad, torch.full((3,), 0.5))
