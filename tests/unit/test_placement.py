"""Placement math of the passes: how views move the sequence dim (merged batch×sequence dims)."""
import torch

from seqpar_compiler.passes.canonicalize import find_attention, sequence_length
from seqpar_compiler.passes.placement import Shard, local_view_shape, view_placement

S = 16


def test_split_heads_keeps_the_sequence_dim():
    assert view_placement((2, S, 64), (2, S, 4, 16), Shard(1), S) == Shard(1)


def test_flatten_batch_and_sequence_keeps_the_sequence_as_a_factor():
    pl = view_placement((2, S, 256), (2 * S, 256), Shard(1), S)
    assert pl == Shard(0, pre=2, post=1)
    assert local_view_shape((2 * S, 256), pl, 4) == [8, 256]


def test_unflatten_restores_a_plain_shard():
    assert view_placement((2 * S, 256), (2, S, 256), Shard(0, pre=2), S) == Shard(1)


def test_flatten_sequence_with_heads_is_a_merged_dim_with_post_factor():
    assert view_placement((2, S, 4, 16), (2, S * 4 * 16), Shard(1), S) == Shard(1, pre=1, post=64)


def test_view_that_splits_the_sequence_is_refused():
    assert view_placement((2, S, 8), (2, 4, 4, 8), Shard(1), S) is None


def test_canonicalize_finds_sdpa_and_its_sequence_length():
    import torch.nn.functional as F

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    graphs = []

    def capture(gm, ex):
        graphs.append(gm)
        return gm.forward
    q = torch.randn(1, 2, S, 8)
    torch._dynamo.reset()
    torch.compile(f, backend=capture)(q, q, q)
    attention = find_attention(graphs[0])
    assert len(attention) == 1 and attention[0].meta["seqpar_attention"]
    assert sequence_length(attention) == S
