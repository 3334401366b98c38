"""Control collectives run on the group's device, and the ring's host-staging path (issue 14).

NCCL serves no CPU tensors; on CPU a ``cuda:gloo`` group behaves the same, so every control
collective (agreement, same-batch check, ``auto``'s broadcast and profile, calibration,
barriers) is called on one here: each must ask for the group's device (CUDA, absent here, so
each raises seqpar's "CUDA is not available" error) instead of failing inside gloo with "No
backend type associated with device type cpu". One 2-rank spawn (~15 s on 2 cores) for all.
"""
import pytest
import torch

import control_workers as W
from seqpar_compiler.launch import run_ranks

P = 2


@pytest.fixture(scope="module")
def results():
    return run_ranks(W.run_all, P, timeout=300)


def test_cuda_only_group_reproduces_the_nccl_failure_on_cpu_tensors(results):
    for r in results:
        assert W.NO_CPU_BACKEND in r["control"]["premise: a CPU tensor on the group"]


@pytest.mark.parametrize("site", ["agreement check", "same-batch check", "ring_attention", "auto's broadcast",
                                  "auto's profile", "calibration", "barrier"])
def test_every_control_collective_asks_for_the_groups_device(results, site):
    for r in results:
        msg = r["control"][site]
        assert msg is not None and W.NO_CPU_BACKEND not in msg, msg
        assert "CUDA is not available in this process" in msg, msg


def test_control_device_is_cpu_when_the_group_serves_cpu(results):
    for r in results:
        assert r["control"]["device: gloo"] == "cpu"
        assert r["control"]["device: cpu:gloo,cuda:gloo"] == "cpu"
        assert r["control"]["after"] is True


@pytest.mark.parametrize("schedule", ["ring", "zigzag", "distflash"])
def test_host_staged_ring_is_bitwise_the_direct_ring(results, schedule):
    for r in results:
        staged, direct = r["staging"][f"{schedule}/staged"], r["staging"][f"{schedule}/direct"]
        assert direct["host_staged_bytes"] == 0
        assert staged["host_staged_bytes"] == staged["ring_bytes"] > 0     # every transfer went through the host
        for a, b in zip(staged["tensors"], direct["tensors"]):
            assert torch.equal(a, b)
        assert staged["rel_err"] < 1e-5, staged["rel_err"]
