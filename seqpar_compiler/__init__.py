"""seqpar: run an unmodified transformer sequence-parallel with ring attention.

The face of the project (docs/architecture.md): the public API, the options registry and the backend
entry. Everything below (passes, runtime, kernels) is reached through here.
"""
import torch._dynamo

from .options import check_environment

# Every SEQPAR_* value is checked here, when the package is imported (by the user or by torch's
# entry point at `torch.compile(..., backend="seqpar")`), so a bad value fails in the first
# second with the registry's message rather than 20 s into tracing inside Dynamo's
# BackendCompilerFailed; unknown SEQPAR_* names warn with the closest option.
check_environment()

from .api import gather_sequence, ring_attention, shard_sequence, ulysses_attention
from .backend import backend, seqpar_backend
from .profile import calibrate
from .runtime.stats import Stats, stats

__all__ = ["Stats", "backend", "calibrate", "gather_sequence", "ring_attention", "shard_sequence", "stats", "ulysses_attention"]

# torch 2.13 registers `torch_dynamo_backends` entry points itself (and imports this package to
# do so); registering again would fail with "duplicate name".
if "seqpar" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(name="seqpar")(seqpar_backend)
