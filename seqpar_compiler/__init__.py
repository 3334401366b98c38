"""seqpar: run an unmodified transformer sequence-parallel with ring attention.

The face of the project (DESIGN §1b): the public API, the options registry and the backend
entry. Everything below (passes, runtime, kernels) is reached through here.
"""
import torch._dynamo

from .api import gather_sequence, ring_attention, shard_sequence
from .backend import backend, seqpar_backend
from .profile import calibrate
from .runtime.stats import Stats, stats

__all__ = ["Stats", "backend", "calibrate", "gather_sequence", "ring_attention", "shard_sequence", "stats"]

# torch 2.13 registers `torch_dynamo_backends` entry points itself (and imports this package to
# do so); registering again would fail with "duplicate name".
if "seqpar" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(name="seqpar")(seqpar_backend)
