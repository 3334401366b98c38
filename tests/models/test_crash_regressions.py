"""Models that crashed seqpar where plain torch.compile works, each once as fixed and once with
the fix's test-only switch restoring the old behaviour (which must fail as it did: the compile
agreement now rescues a failing stage by running the frame replicated, so "fails" is its
"please report" warning with the old exception, or the crash itself where it came after the
backend returned).

  falcon    list indexing ``qkv[..., [-2], :]`` made a tensor constant the generic ATen rule
            emitted as a call ("target _tensor_constant0 has type str but a Callable is
            expected"); switch ``aten_rules._EMIT_CONSTANTS_AS_CALLS``
  device    the generic rule traced ops on meta tensors, so a factory inside one (one_hot's
            arange, x-transformers' rotary code) put meta tensors in the emitted graph
            (FakeTensorDeviceMismatchError in the inner compile); switch ``aten_rules._TRACE_ON_META``
  guards    an activation sharded at a frame's edge was given to aot_autograd as a real tensor
            with no source; the symbols aot made for it broke Dynamo's guard building (IndexError in
            produce_guards_verbose); switch ``frames._DYNAMIC_ENTRY_EXAMPLES``

The default run checks the fixes on models written here in each library's style (2 ranks,
aot_eager); ``slow``: the same models under the switches, and the real library models
(transformers' Falcon, x-transformers 2.31, Mixtral / Qwen3-MoE / DeepSeek-V3 with eager experts)
both ways.
"""
import pytest

from crash_workers import run_crash_cases
from seqpar_compiler.launch import run_ranks

SWITCHES = {"falcon": {"seqpar_compiler.passes.aten_rules": {"_EMIT_CONSTANTS_AS_CALLS": True}},
            "device": {"seqpar_compiler.passes.aten_rules": {"_TRACE_ON_META": True}},
            "guards": {"seqpar_compiler.frames": {"_DYNAMIC_ENTRY_EXAMPLES": True}}}
# what the old behaviour looked like: the text of the agreement's report, or of the crash
OLD = {"falcon": "has type str but a Callable is expected", "device": "FakeTensorDeviceMismatchError",
       "guards": "IndexError"}

HAND_WRITTEN = {"falcon-style": "falcon", "one-hot-routing": "device", "break-before-blocks": "guards"}
REAL = {"falcon-mqa": "falcon", "x-transformers-rotary": "device", "mixtral-eager": "device",
        "qwen3-moe-eager": "device", "deepseek-v3-mla-eager": "guards"}


def _fixed_cases(models):
    return [(name, dict(model=name)) for name in models]


def _old_cases(models):
    return [(f"{name} old", dict(model=name, switches=SWITCHES[fix])) for name, fix in models.items()]


@pytest.fixture(scope="module")
def hand_written():
    return run_ranks(run_crash_cases, 2, _fixed_cases(HAND_WRITTEN), timeout=900, pg_timeout=300)


@pytest.fixture(scope="module")
def old_and_real():
    return run_ranks(run_crash_cases, 2, _old_cases(HAND_WRITTEN) + _fixed_cases(REAL) + _old_cases(REAL),
                     timeout=2400, pg_timeout=900)


def _fixed(results, name, sharded):
    for res in results:
        r = res[name]
        assert r["status"] == "exact", r
        assert not r["reports"], r["reports"]          # no stage failed: the frame compiled sharded
        if sharded:
            assert r["ring_calls"] >= 1


def _old_fails(results, name, fix):
    r = results[0][f"{name} old"]
    seen = " ".join(r["reports"]) + r.get("error", "")
    assert OLD[fix] in seen, r


@pytest.mark.parametrize("name", list(HAND_WRITTEN))
def test_fixed_crash_is_exact_and_sharded(hand_written, name):
    _fixed(hand_written, name, sharded=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HAND_WRITTEN))
def test_the_switch_restores_the_old_failure(old_and_real, name):
    _old_fails(old_and_real, name, HAND_WRITTEN[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_library_model_compiles_and_is_exact(old_and_real, name):
    _fixed(old_and_real, name, sharded=False)      # some still run attention replicated (warned), never crash


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_library_model_fails_as_before_under_the_switch(old_and_real, name):
    _old_fails(old_and_real, name, REAL[name])
