"""Parts of the sequence (``SeqRange``, issue 12 follow-up) and max/min over the sequence, alone:
which local rows hold a part under each layout (from ``runtime/layout.py``), and the rewritten
graph of a chunked loss on a fake 2-rank group (rank 0): parts cut locally, nothing gathered,
one all-reduce per chunk. Exactness against eager is the idiom corpus's job."""
import importlib
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from seqpar_compiler.passes.placement import SeqRange, Shard
from seqpar_compiler.passes.range_layout import local_count, local_shape, part_positions, sub_range


def _ctx(schedule, rank, P, S=32):
    return SimpleNamespace(schedule=schedule, rank=rank, P=P, S=S)


@pytest.mark.parametrize("rank, counts", [(0, [8, 0, 0, 8]), (1, [0, 8, 8, 0])])
def test_zigzag_chunks_live_on_one_rank_and_local_sizes_differ(rank, counts):
    ctx = _ctx("zigzag", rank, 2)
    got = [local_count(ctx, SeqRange(1, start=a, stop=a + 8)) for a in range(0, 32, 8)]
    assert got == counts


def test_striped_part_rows_are_strided_and_cover_the_range_once():
    seen = []
    for r in range(4):
        ctx = _ctx("striped", r, 4)
        part, rows = sub_range(ctx, Shard(1), 5, 16)
        assert part == SeqRange(1, start=5, stop=16)
        assert rows == [i for i, p in enumerate(range(r, 32, 4)) if 5 <= p < 16]
        seen += part_positions(ctx, part)
    assert sorted(seen) == list(range(5, 16))


def test_a_part_of_a_part_and_the_whole_sequence_is_a_plain_shard():
    ctx = _ctx("zigzag", 0, 2)
    outer, _ = sub_range(ctx, Shard(1), 4, 28)
    inner, rows = sub_range(ctx, outer, 0, 6)           # positions [4, 10): rank 0 holds 4..7
    assert inner == SeqRange(1, start=4, stop=10) and rows == [0, 1, 2, 3]
    assert sub_range(ctx, Shard(1), 0, 32)[0] == Shard(1)


def test_local_shape_of_a_merged_part():
    ctx = _ctx("zigzag", 0, 2)
    pl = SeqRange(0, pre=2, post=1, start=4, stop=28)   # rank 0 holds 4..7 and 24..27 (8 of the 24)
    assert local_shape(ctx, (48, 64), pl) == [16, 64]


# -- the rewritten graph on a fake group ------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_group():
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


class _Chunked(nn.Module):
    def __init__(self, extra=None):
        super().__init__()
        self.emb, self.head, self.extra = nn.Embedding(64, 16), nn.Linear(16, 64, bias=False), extra

    def forward(self, ids, y):
        b, s = ids.shape
        h = self.emb(ids)
        q = h.view(b, s, 2, 8).transpose(1, 2)
        h = h + F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(b, s, 16)
        total = 0
        for hc, yc in zip(h.split(8, dim=1), y.split(8, dim=1)):
            lg = self.head(hc)
            if self.extra == "cumsum":
                lg = lg.cumsum(1)
            total = total + F.cross_entropy(lg.flatten(0, 1), yc.flatten(), reduction="sum")
        return total + h.amax(1).sum()


def _rewrite(module, **options):
    from seqpar_compiler.options import resolve_options
    be = importlib.import_module("seqpar_compiler.backend")
    captured = []

    def keep(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward
    torch._dynamo.reset()
    ids, y = torch.randint(0, 64, (2, 32)), torch.randint(0, 64, (2, 32))
    torch.compile(module, backend=keep)(ids, y)
    gm, examples = captured[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = be._shard_graph(gm, examples, dist.group.WORLD, resolve_options(schedule="zigzag", inner="aot_eager", **options))
    return out, [str(w.message) for w in caught if "cannot shard" in str(w.message)]


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def test_chunked_loss_is_cut_locally_and_never_gathered(fake_group):
    gm, falls = _rewrite(_Chunked())
    targets = _targets(gm)
    assert not falls and not any("gather_sequence" in t for t in targets)
    narrows = [n for n in gm.graph.nodes if n.target is torch.narrow]
    hidden = [n for n in narrows if n.args[0] is narrows[0].args[0]]     # the hidden states' four chunks
    assert [(n.args[2], n.args[3]) for n in hidden] == [(0, 8), (0, 0), (0, 0), (8, 8)]   # rank 0: chunks 0, 3
    parts = {n.meta.get("seqpar_placement") for n in gm.graph.nodes}
    assert {SeqRange(1, start=0, stop=8), SeqRange(0, pre=2, post=1, start=24, stop=32)} <= parts
    assert sum("all_reduce" in t for t in targets) >= 4                   # a sum per chunk, MAX, tie count


def test_an_op_without_a_part_rule_gathers_the_part_with_a_warning(fake_group):
    """Four chunks gather at the same op and line: one warning says it (not one per chunk)."""
    gm, falls = _rewrite(_Chunked(extra="cumsum"))
    assert len(falls) == 1 and "cumsum" in falls[0]
    assert sum("gather_sequence" in t for t in _targets(gm)) == 4


def test_fallback_error_refuses_gathering_a_part_and_names_the_op(fake_group):
    from seqpar_compiler.passes.rewrite import SeqparFallbackError
    with pytest.raises(SeqparFallbackError, match="cumsum.*SEQPAR_FALLBACK=error"):
        _rewrite(_Chunked(extra="cumsum"), fallback="error")
