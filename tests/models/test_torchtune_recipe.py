"""torchtune itself (not a model written here) compiled the way its recipes compile it: every
layer on its own and the chunked loss's cross entropy, the backend taken from
``TORCH_COMPILE_BACKEND=seqpar`` (torchtune_recipe_workers). 2 gloo ranks, one step, fp32.

Every layer runs the ring (its frame compiles sequence-parallel: the GQA ``unsqueeze → expand →
flatten(1, 2)`` of a shard is a copy, as on one device, since a SequenceShard reports its local
tensor's layout); the step is exact. The eager chunked output (``h.chunk(8, dim=1)`` in a
``torch.compiler.disable``d method) keeps each chunk a part of the sequence (each rank its own
tokens of it): the output projection runs on them eagerly and the compiled per-chunk cross
entropy compiles each part sequence-parallel; nothing is gathered and nothing is warned.
"""
import pytest

pytest.importorskip("torchtune")

import torchtune_recipe_workers as W  # noqa: E402
from seqpar_compiler.launch import run_ranks  # noqa: E402

ENV = {"TORCH_COMPILE_BACKEND": "seqpar", "SEQPAR_INNER": "aot_eager", "SEQPAR_SCHEDULE": "zigzag"}


@pytest.fixture(scope="module")
def results():
    return run_ranks(W.recipe_step, 2, None, timeout=600, pg_timeout=300, env=ENV)


def test_recipe_compiled_step_is_exact(results):
    for rank, r in enumerate(results):
        assert r["loss"] <= 1e-5, (rank, r["loss"])
        worst = max(r["grads"].items(), key=lambda kv: kv[1])
        assert worst[1] <= 1e-4, (rank, worst)
        assert not r["missing"], r["missing"]


def test_every_layer_frame_runs_the_ring(results):
    for r in results:
        assert r["ring_calls"] == W.LAYERS, (r["ring_calls"], r["warnings"])
    failed = [w for w in results[0]["warnings"] if "failed" in w]
    assert not failed, failed


def test_the_chunked_output_and_loss_stay_sharded(results):
    for r in results:
        assert r["gathers"] == 0, r["gathers"]
        assert not r["warnings"], r["warnings"]
