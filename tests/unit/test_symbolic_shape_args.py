"""Shape arguments of a sharded op keep a symbolic length symbolic (a frame Dynamo traces once
for every length): the sharding core computes an op's local sizes (``expand(B, H, n, S, D)``)
from the symbolic output shape and asks DTensor only on example sizes, so no guard pins the
length. Checked on a fake process group of 2 ranks (no communication) with a ShapeEnv's SymInt,
as Dynamo makes for a dynamic length."""
import pytest
import torch
import torch.distributed as dist
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from seqpar_compiler.runtime.sharding.dtensor_bridge import TENSOR
from seqpar_compiler.runtime.sharding.ops import Refusal, TensorArg, plan_op
from seqpar_compiler.runtime.sharding.placements import Replicate, Shard

aten = torch.ops.aten
P, B, H, D = 2, 2, 2, 16


@pytest.fixture(scope="module", autouse=True)
def fake_group():
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=P)
    yield
    dist.destroy_process_group()


def _length(value: int):
    """A backed SymInt with hint ``value`` and its ShapeEnv."""
    env = ShapeEnv()
    sym = env.create_symintnode(env.create_symbol(value, source=torch._dynamo.source.ConstantSource("S")),
                                hint=value)
    return sym, env


def _expand_plan(S):
    """GQA's repeat_kv on a shard: [B, H, 1, S, D] (sequence on dim 3) expanded to n = 2 copies."""
    src = TensorArg((B, H, 1, S, D), torch.float32, Shard(3))
    size = [B, H, 2, S, D]
    return plan_op(aten.expand.default, (src, size), {}, S=S, P=P, group_name=None, out_shapes=(tuple(size),))


def test_expand_of_a_symbolic_length_adds_no_guard_and_sizes_the_local_length_symbolically():
    S, env = _length(48)
    plan = _expand_plan(S)
    assert env.guards == [], [str(g.expr) for g in env.guards]
    local = plan.args[1]
    assert plan.args[0] is TENSOR and plan.outputs == (Shard(3),)
    assert isinstance(local[3], torch.SymInt) and str(local[3].node.expr) == str((S // P).node.expr)
    assert [int(v) for v in local] == [B, H, 2, 24, D]


def test_expand_of_a_concrete_length_sizes_the_local_length_as_dtensor_does():
    plan = _expand_plan(48)
    assert plan.args[1] == [B, H, 2, 24, D] and plan.outputs == (Shard(3),)


def test_expand_with_minus_one_names_the_local_length():
    S, env = _length(40)
    src = TensorArg((B, 1, S, D), torch.float32, Shard(2))
    plan = plan_op(aten.expand.default, (src, [B, 3, -1, D]), {}, S=S, P=P, group_name=None,
                   out_shapes=((B, 3, S, D),))
    assert env.guards == [] and [int(v) for v in plan.args[1]] == [B, 3, 20, D]


def test_a_symbolic_scalar_argument_comes_back_symbolic():
    """DTensor sees the example value; the plan keeps the caller's symbol (a number taken from
    DTensor would be one length's constant in a graph traced for every length)."""
    S, env = _length(48)
    x = TensorArg((B, S, D), torch.float32, Shard(1))
    plan = plan_op(aten.slice.Tensor, (x, 2, 0, S // 6), {}, S=S, P=P, group_name=None,
                   out_shapes=((B, S, S // 6),))
    assert plan.args[3] is not None and isinstance(plan.args[3], torch.SymInt)
    assert plan.outputs == (Shard(1),) and env.guards == []


def test_replicated_result_keeps_dtensor_shape_arguments():
    """Only a sharded result has its shape argument made local: a buffer shaped otherwise is whole."""
    plan = plan_op(aten.new_zeros.default, (TensorArg((B, 48, D), torch.float32, Shard(1)), [3, D]), {},
                   S=48, P=P, group_name=None, out_shapes=((3, D),))
    assert plan.outputs == (Replicate(),) and plan.args[1] == [3, D]


def test_a_symbolic_argument_dtensor_rewrites_unannounced_is_refused(monkeypatch):
    """A torch whose DTensor does not say which argument it made local (its table moved): the
    rewritten symbolic sizes are refused (the caller gathers, warned), never run as they are."""
    from seqpar_compiler.runtime.sharding import dtensor_bridge
    monkeypatch.setattr(dtensor_bridge, "_shape_and_stride_args", lambda prop, op: (None, None))
    S, _ = _length(48)
    with pytest.raises(Refusal, match="rewrote the symbolic arguments"):
        _expand_plan(S)
    assert _expand_plan(48).args[1] == (B, H, 2, 24, D)        # concrete: DTensor's own answer
