"""Chunked language-model losses as litgpt and torchtune write them, on 2 ranks: each rank
computes its own tokens of every chunk, the sums and counts are global; loss and every gradient
exact (float64) against one process, the ring once per layer, no gather warning.

litgpt's ``chunked_cross_entropy`` splits the flattened logits (``[B·T, V].split(n)``: chunks of
merged sequences, possibly across batch rows) or takes the LM head's own chunks along T, and
sums ``torch.cat`` of the per-chunk losses; torchtune's ``CEWithChunkedOutputLoss`` sums
per-chunk ``reduction="sum"`` losses. Zigzag and striped layouts: a rank's rows of a chunk are
scattered over the chunk. Each loss runs three ways: compiled with the model in one frame, in a
``torch.compiler.disable``d function inside it, and eagerly after the compiled model returns (as
litgpt's and torchtune's recipes call it): in every case nothing is gathered."""
import pytest

import chunked_loss_workers as W
from seqpar_compiler.launch import run_ranks

TOL = 1e-10
# one spawn in the default run (the flat split across rows, litgpt's finetune step, each in the
# compiled step and eagerly after the compiled model); the rest slow
DEFAULT = ["litgpt-flat-split-across-rows", "litgpt-finetune-shifted-head-chunks",
           "litgpt-flat-split-across-rows-eager", "litgpt-finetune-shifted-head-chunks-eager"]
MORE = [n for n in W.CASES if n not in DEFAULT]


@pytest.fixture(scope="module")
def res():
    return run_ranks(W.run_loss_cases, 2, DEFAULT, timeout=900, pg_timeout=300)


@pytest.fixture(scope="module")
def res_more():
    return run_ranks(W.run_loss_cases, 2, MORE, timeout=900, pg_timeout=300)


def _exact(rank, rr):
    assert "error" not in rr, (rank, rr)
    assert rr["loss"] <= TOL, (rank, rr["loss"])
    worst = max(rr["grads"].items(), key=lambda kv: kv[1])
    assert worst[1] <= TOL, (rank, worst)
    assert rr["ring_calls"] == 2, (rank, rr["ring_calls"])


def _fully_sharded(res, name):
    for rank, r in enumerate(res):
        _exact(rank, r[name])
        assert r[name]["warnings"] == [], (rank, r[name]["warnings"])
        assert r[name]["gathers"] == 0, (rank, r[name]["gathers"])


@pytest.mark.parametrize("name", DEFAULT)
def test_chunked_loss_is_exact_and_fully_sharded(res, name):
    _fully_sharded(res, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", MORE)
def test_more_chunked_losses_are_exact_and_fully_sharded(res_more, name):
    _fully_sharded(res_more, name)
