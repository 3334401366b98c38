"""Run a function on P gloo ranks over loopback and collect each rank's result in pytest.

Each spawned rank pays ~3 s to import torch, so tests share one spawn across many cases:
the worker runs them all and returns plain data (floats, dicts, strings) that module-scoped
fixtures hand to many small tests. Every collective has a timeout (the process group's) and the
whole run has a deadline, so a deadlock fails fast instead of hanging CI.
"""
from __future__ import annotations

import datetime
import os
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


def _worker(rank, world_size, port, fn, args, results, pg_timeout, env):
    os.environ.update(env)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout))
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - everything goes back to pytest
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_ranks(fn, world_size: int, *args, timeout: float = 240.0, pg_timeout: float = 60.0,
              env: dict | None = None, allow_failures: bool = False):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    ``fn`` must be importable (module level). With ``allow_failures`` a rank's exception (or
    death) is returned as ``("error", traceback)`` instead of failing the test.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, pg_timeout, env or {}),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
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
        return [got.get(r, ("died", f"rank {r} exited without a result")) for r in range(world_size)]
    if missing:
        raise RankFailure(f"ranks {missing} of {world_size} returned nothing within {timeout:.0f} s "
                          f"(deadlock, crash or timeout); results from {sorted(got)}")
    errors = {r: v for r, (s, v) in got.items() if s != "ok"}
    if errors:
        raise RankFailure("\n".join(f"--- rank {r} raised:\n{tb}" for r, tb in sorted(errors.items())))
    return [got[r][1] for r in range(world_size)]
