"""Eager writes into SequenceShards keep their semantics (2 ranks): a write lands in the shard
where the written region is that shard's tokens, a write that is not is done on the gathered
sequence and its part written back, a write into a plain tensor from a shard lands in the plain
tensor, and a view that picks positions of the sequence (it has no shard form) can be read but
refuses writes and stale reads rather than losing them."""
import pytest

import sequence_shard_write_workers as W
from seqpar_compiler.launch import run_ranks


@pytest.fixture(scope="module")
def res():
    return run_ranks(W.write_cases, 2, timeout=180)


@pytest.mark.parametrize("name", list(W.WRITES) + ["plain_add_shard", "plain_copy_shard", "read_last_position",
                                                   "read_split_view"])
def test_eager_writes_and_reads_match_the_plain_tensor(res, name):
    for r in res:
        assert r[name] <= 1e-6, r[name]


@pytest.mark.parametrize("name", ["write_into_position", "write_into_split_view"])
def test_a_write_into_a_gathered_view_is_refused_with_what_to_do(res, name):
    for r in res:
        assert "would not reach the sharded tensor" in r[name] and "full_tensor()" in r[name], r[name]


def test_reading_a_gathered_view_after_its_shard_was_written_is_refused(res):
    for r in res:
        assert "no longer shows it" in r["stale_view_read"], r["stale_view_read"]
