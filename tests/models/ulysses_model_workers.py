"""Model cases of ``model_workers`` under the all-to-all schedules (issue 15), each inside a
``stats()`` block so the test can tell the all-to-all op ran (nested stats blocks all count)."""
from __future__ import annotations

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


def run_cases(rank, P, cases):
    fns = {"train": W.train_step_case, "hf": W.hf_case, "packed": W.packed_doc_case, "local": local_output_case}
    out = {}
    for name, kind, kw in cases:
        with sp.stats() as s:
            out[name] = fns[kind](rank, P, **kw)
        out[name]["a2a_bytes"] = s.a2a_bytes_sent
        out[name]["attention_calls"] = s.attention_forward_calls
    return out
