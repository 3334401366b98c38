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
