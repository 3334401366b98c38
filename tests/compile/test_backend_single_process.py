"""The backend with no process group: plain compilation, options checked."""
import pytest
import torch

import seqpar_compiler as sp


def test_without_process_group_the_backend_equals_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    x = torch.randn(2, 5, 8)
    compiled = torch.compile(model, backend=sp.backend(inner="aot_eager"))
    out = compiled(x)
    assert torch.allclose(out, model(x), atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_backend_rejects_bad_options_with_allowed_values():
    with pytest.raises(ValueError, match="allowed: ring, zigzag, striped, distflash"):
        sp.backend(schedule="sideways")
    with pytest.raises(ValueError, match="unknown seqpar option"):
        sp.backend(chunks=3)


def test_bad_env_value_raises_at_backend_creation_before_any_tracing(monkeypatch):
    """A typo'd value fails when the backend is made, not 20 s into tracing (issue 16)."""
    traced = []
    monkeypatch.setenv("SEQPAR_SCHEDULE", "zigzig")
    with pytest.raises(ValueError, match=r"^bad value 'zigzig' for SEQPAR_SCHEDULE; allowed: ring, zigzag"):
        torch.compile(lambda x: traced.append(1) or x + 1, backend=sp.backend(inner="aot_eager"))
    assert not traced


def test_bad_env_value_inside_backend_compiler_failed_is_the_registry_message_first(monkeypatch):
    """Set after import: `backend="seqpar"` checks again as its first step; Dynamo wraps what a
    backend raises, and the message inside is the registry's, first line first."""
    monkeypatch.setenv("SEQPAR_FFN_CHUNKS", "0")
    monkeypatch.setenv("SEQPAR_INNER", "aot_eager")
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        torch.compile(lambda x: x + 1, backend="seqpar")(torch.ones(3))
    inner = info.value.inner_exception
    assert isinstance(inner, ValueError)
    assert str(inner).splitlines()[0] == "bad value '0' for SEQPAR_FFN_CHUNKS; allowed: int >= 1"


_IMPORT = """
import torch
traced = []
def f(x):
    traced.append(1)
    return x + 1
try:
    {how}
except ValueError as err:
    print("RAISED", str(err).splitlines()[0], "TRACED", len(traced))
"""


@pytest.mark.parametrize("how", ["import seqpar_compiler", "torch.compile(f, backend='seqpar')"],
                         ids=["import", "entry_point"])
def test_bad_env_value_fails_at_import_before_any_tracing(how):
    """`backend="seqpar"` reads the env: it is checked when the package is imported, which
    torch.compile does through the entry point before it traces anything."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "SEQPAR_SCHEDULE": "zigzig"}
    proc = subprocess.run([sys.executable, "-c", _IMPORT.format(how=how)], capture_output=True, text=True,
                          env=env, timeout=180)
    from seqpar_compiler.options import OPTIONS
    allowed = OPTIONS["schedule"].allowed()
    assert f"RAISED bad value 'zigzig' for SEQPAR_SCHEDULE; allowed: {allowed} TRACED 0" in proc.stdout, \
        proc.stdout + proc.stderr[-2000:]


def test_reaching_dynamos_recompile_limit_is_a_loud_warning():
    """Issue 13: past torch._dynamo.config.recompile_limit (8) new lengths run eagerly and
    unsharded; the 8th compile of a frame says so, naming the frame and what to do."""
    import warnings
    torch._dynamo.reset()
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend=sp.backend(inner="aot_eager"), dynamic=False)
    limit = torch._dynamo.config.recompile_limit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for S in range(1, limit + 2):
            compiled(torch.randn(1, S, 4))
    said = [str(w.message) for w in caught if "recompile limit" in str(w.message)]
    assert len(said) == 1, said
    assert f"compiled {limit} times" in said[0] and "'forward'" in said[0]
    assert "EAGER and UNSHARDED" in said[0] and "bucket" in said[0] and "recompile_limit" in said[0]
