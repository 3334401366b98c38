"""Bucket the parameter-gradient sums of a sharded graph.

``rewrite`` puts one ``sum_grad_over_group(param)`` (identity forward, all-reduce backward) on
every parameter that meets shards: a real model then issues hundreds of small all-reduces per
step. Like DDP's reducer, this pass groups them into buckets of about ``bucket_bytes`` in the
order the backward produces the gradients (the reverse of first use), one
``sum_grads_over_group`` per bucket: one all-reduce each, and a bucket's all-reduce can start
as soon as its own gradients are done. Buckets hold one dtype each (one flat buffer).

Reads: the rewritten graph's ``sum_grad_over_group`` nodes and ``meta["example_value"]`` of
their inputs (Dynamo's, copied onto placeholders). Writes: ``sum_grads_over_group`` nodes right
after the placeholders, ``getitem``s in place of the old nodes; ``meta["seqpar_placement"]``
Replicate on them.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from seqpar_compiler.runtime.grad_collectives import sum_grad_over_group, sum_grads_over_group

from .placement import Replicate

__all__ = ["BUCKET_BYTES", "bucket_grad_sums"]

# DDP's default bucket size (torch.nn.parallel.DistributedDataParallel, bucket_cap_mb=25)
BUCKET_BYTES = 25 * 2**20


def _nbytes(node: fx.Node) -> int | None:
    ex = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(ex, torch.Tensor):
        return None
    return ex.numel() * ex.element_size()


def bucket_grad_sums(graph: fx.Graph, bucket_bytes: int = BUCKET_BYTES) -> int:
    """Replace the per-parameter gradient sums of ``graph`` by bucketed ones; returns the number
    of buckets. Sums whose input size or dtype is unknown stay as they are."""
    sums = [n for n in graph.nodes if n.op == "call_function" and n.target is sum_grad_over_group]
    if len(sums) < 2:
        return 0
    buckets: list[list[fx.Node]] = []
    open_by_key: dict = {}
    for node in reversed(sums):              # the backward reaches the last-used parameters first
        x = node.args[0]
        size = _nbytes(x) if isinstance(x, fx.Node) else None
        if size is None:
            continue
        ex = x.meta.get("example_value", x.meta.get("val"))
        key = (node.args[1], ex.dtype, ex.device)
        bucket = open_by_key.get(key)
        if bucket is None or bucket[1] + size > bucket_bytes and bucket[0]:
            bucket = open_by_key[key] = ([], 0)
            buckets.append(bucket[0])
        bucket[0].append(node)
        open_by_key[key] = (bucket[0], bucket[1] + size)
    anchor = next(n for n in reversed(list(graph.nodes)) if n.op == "placeholder")
    made = 0
    for bucket in buckets:
        if len(bucket) < 2:
            continue
        with graph.inserting_after(anchor):
            group_name = bucket[0].args[1]
            summed = graph.call_function(sum_grads_over_group, (group_name, *[n.args[0] for n in bucket]))
            summed.meta["seqpar_placement"] = tuple(Replicate() for _ in bucket)
        anchor = summed
        for i, old in enumerate(bucket):
            with graph.inserting_after(anchor):
                item = graph.call_function(operator.getitem, (summed, i))
            item.meta.update(old.meta)
            anchor = item
            old.replace_all_uses_with(item)
            graph.erase_node(old)
        made += 1
    return made
