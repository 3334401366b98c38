"""Losses written eagerly on a compiled model's logits, as training code in many styles writes
them (shifted slices, transformers' padded shift, classes-second cross entropy, per-token
log-probs, masked means, label smoothing, z-loss, KL, pooling, the last token): on 2 ranks each
runs on the ranks' own tokens, equals the one-process float64 loss and gradients, gathers
nothing (a read of one position moves only that row) and warns nothing."""
import pytest

import eager_loss_workers as W
from seqpar_compiler.launch import run_ranks


@pytest.fixture(scope="module")
def res():
    return run_ranks(W.run_idioms, 2, list(W.IDIOMS), timeout=600, pg_timeout=300)


@pytest.mark.parametrize("name", list(W.IDIOMS))
def test_eager_loss_idiom_is_exact_and_sharded(res, name):
    for rank, by_name in enumerate(res):
        r = by_name[name]
        assert r["loss"] <= 1e-12 and r["grads"] <= 1e-12, (rank, r)
        assert r["plain"], (rank, r)               # a scalar loss is a plain tensor, the same on every rank
        assert r["gathers"] == W.ROW_READS.get(name, 0), (rank, r)
        assert r["warnings"] == [], (rank, r["warnings"])
