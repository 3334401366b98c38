"""DTensor's sharding strategies through seqpar's one compatibility module (issue 12): what the
generic ATen rule relies on, checked on a fake process group of 2 ranks (no communication)."""
import pytest
import torch
import torch.distributed as dist

from seqpar_compiler.passes.dtensor_compat import TENSOR, ArgSpec, propagate

aten = torch.ops.aten


@pytest.fixture(scope="module", autouse=True)
def fake_group():
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def _x(shape, shard):
    return ArgSpec(tuple(shape), torch.float32, shard)


def test_unbind_off_the_sequence_keeps_every_piece_sharded():
    out = propagate(aten.unbind.int, (_x((2, 32, 2, 4, 8), 1), 2), {}, 2)
    assert out.outputs == (("shard", 1), ("shard", 1)) and out.inputs == (("shard", 1),)


def test_a_projection_keeps_the_token_dim_and_wants_the_weight_replicated():
    out = propagate(aten.mm.default, (_x((64, 32), 0), _x((32, 16), None)), {}, 2)
    assert out.outputs == (("shard", 0),) and out.inputs == (("shard", 0), ("replicate",))


def test_a_scan_along_the_sequence_needs_it_gathered():
    out = propagate(aten.cumsum.default, (_x((2, 32, 8), 1), 1), {}, 2)
    assert out.inputs[0] != ("shard", 1)


def test_view_shape_arguments_come_back_local_and_scalars_keep_their_form():
    out = propagate(aten.view.default, (_x((2, 32, 64), 1), [2, 32, 8, 8]), {}, 2)
    assert out.args == (TENSOR, (2, 16, 8, 8)) or out.args == (TENSOR, [2, 16, 8, 8])
    squeezed = propagate(aten.squeeze.dim, (_x((2, 32, 1), 1), 2), {}, 2)
    assert squeezed.args == (TENSOR, 2)


def test_a_sum_over_the_sequence_is_partial():
    out = propagate(aten.sum.dim_IntList, (_x((2, 32, 8), 1), [1]), {}, 2)
    assert out.outputs == (("partial", "sum"),)
