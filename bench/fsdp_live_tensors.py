"""Which tensors are alive at the activation peak of one training step.

    python bench/fsdp_live_tensors.py --S 4096 --ranks 4      # aot_eager inner compiler

Why: ``bench/fsdp_step.py`` showed FSDP2 + per-block compile 1.26x above whole-model seqpar in
activation memory at P=4 (peak RSS, which says how much but not what). This script runs the same
model and arrangements under a ``TorchDispatchMode`` that follows every tensor an ATen op makes
(a SequenceShard by its local shard) until it dies (``weakref.finalize``: torch keeps a tensor's
Python object alive while autograd holds it) and keeps the live bytes, their peak, and what was
alive at the peak: the tensors with a dim of the whole sequence S are the ones that defeat
sequence parallelism. Ops inside custom ops (the ring, the sequence gather's temporaries) and
inside inductor kernels are not seen, hence the ``aot_eager`` inner compiler; the figures are a
tensor-level account, not RSS. Prints a table per rank 0 and writes
bench/results/fsdp_live_tensors.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import weakref

sys.path.insert(0, os.path.dirname(__file__))

from fsdp_step import ARRANGEMENTS, _build  # noqa: E402

MIB = 2 ** 20


def _where() -> str:
    """The innermost model / seqpar / FSDP source lines that made a large tensor."""
    import traceback
    keep = [f for f in traceback.extract_stack()[:-3]
            if any(k in f.filename for k in ("models.py", "seqpar", "runtime", "fsdp", "fully_shard"))
            and "fsdp_live_tensors" not in f.filename]
    return "  <- " + " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in keep[-3:][::-1])


def _live_tensor_mode(S: int):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from seqpar_compiler.runtime.sequence_shard import SequenceShard

    class LiveTensors(TorchDispatchMode):
        """Live bytes of the storages ATen ops make while the mode is on, and their peak."""

        def __init__(self):
            super().__init__()
            self.live: dict[int, list] = {}          # storage ptr -> [tensors alive, bytes, what, phase]
            self.total = 0
            self.peak = {"forward": 0, "backward": 0}           # per phase of the step
            self.at_peak: dict[str, list] = {"forward": [], "backward": []}
            self.phase = "forward"

        @classmethod
        def ignore_compile_internals(cls):        # let compiled frames run (their aot_eager ops are seen)
            return True

        def _release(self, key):
            entry = self.live.get(key)
            if entry is not None:
                entry[0] -= 1
                if entry[0] == 0:
                    self.total -= entry[1]
                    del self.live[key]

        def _track(self, t, func):
            local = t._local if isinstance(t, SequenceShard) else t
            if not isinstance(local, torch.Tensor) or local.device.type == "meta":
                return
            storage = local.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0:
                return
            entry = self.live.get(key)
            if entry is None:
                full = S in t.shape and (not isinstance(t, SequenceShard) or S in local.shape)
                what = f"{func} {tuple(local.shape)} {str(local.dtype)[6:]}{' FULL-LENGTH' if full else ''}"
                entry = self.live[key] = [0, nbytes, what + (_where() if nbytes >= 2 * MIB else ""), self.phase]
                self.total += nbytes
            entry[0] += 1
            weakref.finalize(local, self._release, key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._track(t, func)
            if self.total > self.peak[self.phase]:
                self.peak[self.phase] = self.total
                self.at_peak[self.phase] = sorted(((e[1], e[2], e[3]) for e in self.live.values()), reverse=True)
            return out
    return LiveTensors()


def live_worker(rank, P, S, layers, width, heads):
    """Per arrangement: a compiling step, then one step under the live-tensor mode."""
    import torch
    out = {}
    for arrangement in ARRANGEMENTS:
        torch._dynamo.reset()
        model, step_loss, cfg = _build(arrangement, S, layers, width, heads)
        g = torch.Generator().manual_seed(1)
        idx = torch.randint(0, cfg.vocab_size, (1, S), generator=g)
        tgt = torch.randint(0, cfg.vocab_size, (1, S), generator=g)
        step_loss(idx, tgt).backward()                   # compile
        model.zero_grad(set_to_none=False)
        mode = _live_tensor_mode(S)
        with mode:
            loss = step_loss(idx, tgt)
            mode.phase = "backward"
            loss.backward()
        out[arrangement] = {phase: {"peak_mib": mode.peak[phase] / MIB,
                                    "at_peak": [(b / MIB, what, made) for b, what, made in mode.at_peak[phase]
                                                if b >= MIB // 4]}
                            for phase in mode.peak}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "fsdp_live_tensors.json"))
    args = ap.parse_args()
    import torch

    from seqpar_compiler.launch import run_ranks
    res = run_ranks(live_worker, args.ranks, args.S, args.layers, args.width, args.heads, timeout=3600,
                    pg_timeout=1800, env={"SEQPAR_INNER": "aot_eager"})
    print(f"\nS={args.S} P={args.ranks}, LLaMA-style {args.layers}x{args.width}; live tensors made by ATen ops "
          f"(aot_eager), rank 0; MiB")
    for arrangement, phases in res[0].items():
        for phase, r in phases.items():
            print(f"\n{arrangement}, {phase} peak {r['peak_mib']:.1f} MiB; alive then (>= 0.25 MiB):")
            print(f"{'MiB':>7}  {'made in':<9} what")
            for mib, what, made in r["at_peak"]:
                print(f"{mib:7.2f}  {made:<9} {what}")
    print(f"\n{'arrangement':<16} {'fwd peak MiB':>13} {'bwd peak MiB':>13}   (rank 0; live ATen tensors, not RSS)")
    for arrangement, phases in res[0].items():
        print(f"{arrangement:<16} {phases['forward']['peak_mib']:13.1f} {phases['backward']['peak_mib']:13.1f}")
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "S": args.S, "P": args.ranks, "ranks": res}, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
