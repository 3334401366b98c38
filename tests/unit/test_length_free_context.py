"""The flatten contexts of the values that cross frames leave the sequence length out (issue 13,
"Lengths"): Dynamo guards on the context by equality, so a length in it recompiled every frame at
every new length. S comes back from the outer size in ``__tensor_unflatten__``, and what runs on a
symbolic shard while Dynamo traces (layout segments, spec hashing) takes a SymInt S."""
import torch
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from seqpar_compiler.runtime.layout import local_positions, local_segments
from seqpar_compiler.kernels import AttentionSpec
from seqpar_compiler.runtime.proved_mask import MaskFacts, ProvedMask
from seqpar_compiler.runtime.sequence_shard import SequenceShard, ShardSpec


def _sym(value: int) -> torch.SymInt:
    """A backed SymInt with hint ``value``, as Dynamo makes for a dynamic length."""
    env = ShapeEnv()
    return env.create_symintnode(env.create_symbol(value, source=torch._dynamo.source.ConstantSource("s")),
                                 hint=value)


def test_shard_context_has_no_length_and_unflatten_reads_it_from_the_size():
    spec = ShardSpec(1, 48, "zigzag", "g", pre=1, post=1)
    a = SequenceShard(torch.randn(3, 24, 8), spec)
    b = SequenceShard(torch.randn(3, 40, 8), ShardSpec(1, 80, "zigzag", "g"))
    (names, ctx_a), (_, ctx_b) = a.__tensor_flatten__(), b.__tensor_flatten__()
    assert ctx_a == ctx_b and 48 not in ctx_a          # equal context: Dynamo's guard passes
    again = SequenceShard.__tensor_unflatten__({n: getattr(b, n) for n in names}, ctx_b, b.shape, b.stride())
    assert again.spec == b.spec and again.spec.S == 80
    merged = ShardSpec(0, 48, "ring", "g", pre=3, post=1)      # logits.view(-1, V): dim 0 is B·S
    m = SequenceShard(torch.randn(72, 5), merged)
    names, ctx = m.__tensor_flatten__()
    assert SequenceShard.__tensor_unflatten__({"_local": m._local}, ctx, m.shape, m.stride()).spec == merged


def test_mask_context_has_no_length():
    facts = [MaskFacts(S, AttentionSpec.of(causal=True, window=4), "additive", -1.0) for S in (12, 20)]
    masks = [ProvedMask(torch.empty(0), f, (2, 1, f.S, f.S), (f.S * f.S, f.S * f.S, f.S, 1), torch.float32)
             for f in facts]
    (names, c12), (_, c20) = masks[0].__tensor_flatten__(), masks[1].__tensor_flatten__()
    assert c12 == c20
    again = ProvedMask.__tensor_unflatten__({"tokens": masks[1].tokens}, c20, masks[1].shape, masks[1].stride())
    assert again.facts == facts[1]


def test_symbolic_length_specs_hash_and_segments_compute():
    S = _sym(48)
    spec = ShardSpec(1, S, "zigzag", "g")
    hash(spec)                                        # S is not hashed (a SymInt cannot be)
    hash(MaskFacts(S, AttentionSpec.of(causal=True), "visible"))
    segs = local_segments("zigzag", 1, 2, S // 2)     # not cached: lru_cache would hash the SymInt
    assert [(s.start, s.count) for s in segs] == [(S // 4, S // 4), (2 * (S // 4), S // 4)]
    assert local_segments("zigzag", 1, 2, 24) == local_segments("zigzag", 1, 2, 24)
    assert local_positions("zigzag", 1, 2, 48).tolist() == list(range(12, 24)) + list(range(24, 36))
