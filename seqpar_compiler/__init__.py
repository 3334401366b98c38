"""seqpar: run an unmodified transformer sequence-parallel with ring attention.

The face of the project (DESIGN §1b): the public API, the options registry and, later, the
backend entry. Everything below (passes, runtime, kernels) is reached through here.
"""
from .api import gather_sequence, ring_attention, shard_sequence
from .runtime.stats import Stats, stats

__all__ = ["Stats", "gather_sequence", "ring_attention", "shard_sequence", "stats"]
