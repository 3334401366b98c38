"""One measured training step of the example GPT on a spawned rank: time, activation memory and
ring counters. Shared by bench/checkpointing.py and bench/memory.py.

"Activation memory" is the peak RSS during the step minus the RSS before it (docs/architecture.md), with the
window covering forward + backward: parameter gradients already exist before it (zeroed, not
freed, between steps) and the optimizer step runs after it (timed, not in the window), so the
figure is the activations and their gradients, not model state; with gradients freed and AdamW's
foreach temporaries inside the window, a fixed ~4× parameter size hides the activations of short
local sequences. Two things keep RSS honest on Linux/glibc: the peak is reset before the step through
/proc/self/clear_refs ("5" resets VmHWM), and MALLOC_MMAP_THRESHOLD_ (set before the rank starts)
makes every large tensor its own mmap, returned to the system when freed, so memory freed by
the compile step or the previous step is not left in the heap where RSS would count it.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

from seqpar_compiler.process_memory import reset_peak_rss, status_kib, trim_malloc  # noqa: E402

# fixed (not dynamic) threshold: glibc otherwise raises it after the first large free
RANK_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def step_worker(rank, P, *, S, layers=4, width=256, heads=8, backend="seqpar", steps=2, logits=False,
                **options):
    """Compile, run one step, then ``steps`` measured steps (fwd + bwd + AdamW).

    ``P == 1`` runs as a plain single process: the process group is torn down first, so the
    seqpar backend takes its no-group path (inductor plus the memory passes).

    The compiled step returns the loss only, as a trainer that does not look at the logits
    would write it: the full [S, vocab] logits a model returns are a per-*global*-token output
    (with the default ``SEQPAR_OUTPUT=gather`` every rank holds all of them, and autograd a
    zero gradient of that size) and would hide the per-rank activations. ``logits=True``
    returns them too, to measure that cost.
    """
    import torch
    import torch.distributed as dist
    if P == 1 and dist.is_initialized():
        dist.destroy_process_group()
    import seqpar_compiler as sp
    from models import GPT, GPTConfig
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=layers, n_embd=width, n_head=heads, vocab_size=256, block_size=S)
    model = GPT(cfg)          # SDPA attention: no S×S mask buffer
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    def loss_only(idx, tgt):
        return model(idx, tgt)[1]
    compiled = torch.compile(model if logits else loss_only,
                             backend=sp.backend(**options) if backend == "seqpar" else backend)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (1, S), generator=g)
    tgt = torch.randint(0, cfg.vocab_size, (1, S), generator=g)

    def forward_backward():
        result = compiled(idx, tgt)            # logits (held until the step ends, as a trainer would) + loss
        loss = result[1] if logits else result
        loss.backward()
        return loss.item()

    def optimizer_step():
        opt.step()
        opt.zero_grad(set_to_none=False)
    start = time.perf_counter()
    forward_backward()                       # compile
    optimizer_step()
    return measure_steps(forward_backward, optimizer_step, steps, compile_seconds=time.perf_counter() - start)


def measure_steps(forward_backward, optimizer_step, steps: int, *, compile_seconds: float,
                  counters: dict | None = None) -> dict:
    """``steps`` measured steps after the compiling one: best time, activation memory (peak RSS of
    forward + backward over RSS before it) and peak RSS in MiB, ring forwards of the last step,
    and for each ``counters`` name -> zero-argument function, its increase over the last step."""
    import seqpar_compiler as sp
    counters = counters or {}
    times, act, peaks, calls = [], [], [], []
    grown = {name: 0 for name in counters}
    for _ in range(steps):
        trim_malloc()
        before = status_kib("VmRSS")
        reset = reset_peak_rss()
        start_counts = {name: read() for name, read in counters.items()}
        with sp.stats() as st:
            start = time.perf_counter()
            forward_backward()
            peaks.append(status_kib("VmHWM"))
            optimizer_step()
            times.append(time.perf_counter() - start)
        act.append(peaks[-1] - before)
        calls.append(st.attention_forward_calls)
        grown = {name: read() - start_counts[name] for name, read in counters.items()}
    return {"seconds": min(times), "activation_mib": min(act) / 1024, "peak_rss_mib": min(peaks) / 1024,
            "compile_seconds": compile_seconds, "peak_reset": reset, "attention_forward_calls": calls[-1], **grown}
