"""`backend="seqpar"` resolves in fresh processes, with and without importing the package."""
import subprocess
import sys

import pytest

SNIPPET = """
import os, torch
{imp}
f = torch.compile(lambda x: x.sin() + 1, backend="seqpar")
x = torch.linspace(0, 1, 5)
assert torch.allclose(f(x), x.sin() + 1)
print("OK")
"""


@pytest.mark.parametrize("imp", ["", "import seqpar_compiler"], ids=["entry_point", "import"])
def test_backend_name_resolves_in_a_fresh_process(imp):
    env = {"SEQPAR_INNER": "aot_eager"}
    import os
    proc = subprocess.run([sys.executable, "-c", SNIPPET.format(imp=imp)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=180)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]
