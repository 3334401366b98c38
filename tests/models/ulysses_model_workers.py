"""Model cases of ``model_workers`` under the all-to-all schedules (issue 15), each inside a
``stats()`` block so the test can tell the all-to-all op ran (nested stats blocks all count)."""
from __future__ import annotations

import glob
import logging
import os
import tempfile

import torch

import model_workers as W
import seqpar_compiler as sp
from seqpar_compiler.runtime import local_positions


def local_output_case(rank, P, *, model="gpt", S=32, schedule="ulysses", ulysses_degree=None):
    """SEQPAR_OUTPUT=local under an all-to-all layout: the logits are this rank's rows in it, and
    gather_sequence with the same schedule (and degree) restores the full logits."""
    torch.manual_seed(0)
    m = W.MODELS[model]()
    idx, tgt = W._batch(S)
    ref, _ = m(idx, tgt)
    torch._dynamo.reset()
    cm = torch.compile(m, backend=sp.backend(inner="aot_eager", output="local", schedule=schedule,
                                             ulysses_degree=ulysses_degree))
    local, _ = cm(idx, tgt)
    layout = f"hybrid:{ulysses_degree}" if schedule == "hybrid" else schedule
    full = sp.gather_sequence(local.detach(), 1, schedule=schedule, ulysses_degree=ulysses_degree)
    return {"shape": list(local.shape), "err": W._rel(local, ref[:, local_positions(layout, rank, P, S)]),
            "gathered_err": W._rel(full, ref)}


class _SeqparLog(logging.Handler):
    """The ``seqpar`` logger's messages (the partitioner policy says there what it did)."""

    def __enter__(self):
        self.messages, self.logger = [], logging.getLogger("seqpar")
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)

    def emit(self, record):
        self.messages.append(record.getMessage())


def checkpoint_case(rank, P, *, kind, checkpoint, **kw):
    """A case of ``kind`` under SEQPAR_CHECKPOINT=``checkpoint`` (the env, since the packed-document
    case builds its backend without options), with the policy's log lines and the attention
    forward / backward counts of the step."""
    old = os.environ.get("SEQPAR_CHECKPOINT")
    os.environ["SEQPAR_CHECKPOINT"] = checkpoint
    try:
        with _SeqparLog() as logs, sp.stats() as s:
            out = {"train": W.train_step_case, "packed": W.packed_doc_case}[kind](rank, P, **kw)
    finally:
        if old is None:
            os.environ.pop("SEQPAR_CHECKPOINT")
        else:
            os.environ["SEQPAR_CHECKPOINT"] = old
    out.update(forward_calls=s.attention_forward_calls, backward_calls=s.attention_backward_calls,
               policy_log=[m for m in logs.messages if "checkpoint=" in m])
    return out


def dump_case(rank, P, *, model="llama", **options):
    """A training step with SEQPAR_DUMP (backend(dump=)): rank 0's summary.txt of every frame."""
    with tempfile.TemporaryDirectory() as root:
        out = W.train_step_case(rank, P, model=model, dump=root, **options)
        out["summaries"] = [open(f).read() for f in sorted(glob.glob(os.path.join(root, "frame-*", "rank0",
                                                                                    "summary.txt")))]
    return out


def run_cases(rank, P, cases):
    fns = {"train": W.train_step_case, "hf": W.hf_case, "packed": W.packed_doc_case, "local": local_output_case,
           "checkpoint": checkpoint_case, "dump": dump_case}
    out = {}
    for name, kind, kw in cases:
        with sp.stats() as s:
            out[name] = fns[kind](rank, P, **kw)
        out[name]["a2a_bytes"] = s.a2a_bytes_sent
        out[name]["attention_calls"] = s.attention_forward_calls
    return out
