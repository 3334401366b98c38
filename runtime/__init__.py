"""The ring at run time: layouts and schedules, communication, the custom op pair, stats.

Knows nothing of graphs (docs/architecture.md); the passes import op handles and layout math from here.
"""
from .layout import SCHEDULES, Segment, check_sequence_length, local_positions, local_segments
from .plan import RingPlan, build_plan
from .rank_dropout import rank_dropout_op
from .ring_op import ring_attention_backward_op, ring_attention_op
from .sequence_ops import gather_sequence_op, shard_sequence_op
from .sequence_fetch import sequence_fetch_op
from .sequence_mixing import padded_conv1d_op
from .stats import Stats, stats
from .ulysses_op import ulysses_attention_backward_op, ulysses_attention_op

__all__ = [
    "SCHEDULES",
    "RingPlan",
    "Segment",
    "Stats",
    "build_plan",
    "check_sequence_length",
    "gather_sequence_op",
    "local_positions",
    "local_segments",
    "ring_attention_backward_op",
    "ring_attention_op",
    "shard_sequence_op",
    "sequence_fetch_op",
    "padded_conv1d_op",
    "rank_dropout_op",
    "stats",
    "ulysses_attention_backward_op",
    "ulysses_attention_op",
]
