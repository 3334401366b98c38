"""Run a function on P gloo ranks over loopback, without torchrun, and collect each rank's result.

Used by the tests, the benchmarks and the demo. Each spawned rank pays ~3 s to import torch,
so callers share one spawn across many cases: the function runs them all and returns plain
data (floats, dicts, strings). Every collective has a timeout (the process group's) and the
whole run has a deadline, so a deadlock fails fast instead of hanging.
"""
from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import traceback

import torch.multiprocessing as mp

__all__ = ["run_ranks", "RankFailure"]


class RankFailure(AssertionError):
    """A rank raised (its traceback is in the message) or the run timed out."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results, pg_timeout, env, threads, backend="gloo"):
    os.environ.update(env)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout))
        out = fn(rank, world_size, *args)
        # Plain pickle (tensors by value): torch's queue reducers pass tensors through shared
        # memory that dies with this process before the parent reads it.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - everything goes back to the caller
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_ranks(fn, world_size: int, *args, timeout: float = 240.0, pg_timeout: float = 60.0,
              env: dict | None = None, allow_failures: bool = False, threads: int = 1, backend: str = "gloo"):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    ``fn`` must be importable (module level); each rank uses ``threads`` intra-op threads. With
    ``allow_failures`` a rank's exception (or death) is returned as ``("error", traceback)`` or
    ``("died", message)`` instead of raising ``RankFailure``. ``backend`` is passed to
    ``init_process_group`` (``"cuda:gloo"`` makes a group that, like NCCL, serves no CPU tensors).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, pg_timeout, env or {}, threads,
                                                          backend),
                         daemon=True) for r in range(world_size)]
    # The environment must be in place before a child imports anything (TRITON_INTERPRET is
    # read when triton is first imported, which importing seqpar_compiler already does).
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    got: dict[int, tuple] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(got) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
                got[rank] = (status, value)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in got]
                if dead and all(not p.is_alive() for r, p in enumerate(procs) if r not in got):
                    break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    missing = [r for r in range(world_size) if r not in got]
    if allow_failures:
        return [(s, pickle.loads(v) if s == "ok" else v)
                for s, v in (got.get(r, ("died", f"rank {r} exited without a result")) for r in range(world_size))]
    if missing:
        raise RankFailure(f"ranks {missing} of {world_size} returned nothing within {timeout:.0f} s "
                          f"(deadlock, crash or timeout); results from {sorted(got)}")
    errors = {r: v for r, (s, v) in got.items() if s != "ok"}
    if errors:
        raise RankFailure("\n".join(f"--- rank {r} raised:\n{tb}" for r, tb in sorted(errors.items())))
    return [pickle.loads(got[r][1]) for r in range(world_size)]
