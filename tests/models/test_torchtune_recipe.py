"""torchtune itself (not a model written here) compiled the way its recipes compile it: every
layer on its own and the chunked loss's cross entropy, the backend taken from
``TORCH_COMPILE_BACKEND=seqpar`` (torchtune_recipe_workers). 2 gloo ranks, one step, fp32.

Every layer runs the ring (its frame compiles sequence-parallel: the GQA ``unsqueeze → expand →
flatten(1, 2)`` of a shard is a copy, as on one device, since a SequenceShard reports its local
tensor's layout); the step is exact. Not yet sharded, and warned: the eager chunked output
splits the sequence between frames (parts of the sequence do not cross frames), so the output
projection and the loss run on gathered chunks.
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


def test_the_gathered_chunked_output_is_warned_not_quiet(results):
    said = results[0]["warnings"]
    assert any("aten.split" in w and "gathering" in w for w in said), said
