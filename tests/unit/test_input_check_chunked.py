"""The same-batch fingerprint reads a large input in chunks (issue 13 follow-up).

Why: under FSDP2 per-block compile the first block's input is the eager root's full-length
activation; float64 copies of all of it (value, weights, product) were the step's memory peak
at P=4 (bench/fsdp_live_tensors.py). The chunked sums must equal the one-pass float64 formula
and still tell a permutation apart, with no temporary larger than a chunk.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seqpar_compiler import input_check


def _one_pass(x):
    flat = x.reshape(-1).to(torch.float64)
    weights = 1.0 + torch.arange(flat.numel(), dtype=torch.float64).remainder(97)
    return float(flat.sum()), float((flat * weights).sum())


def test_chunked_sums_equal_the_one_pass_float64_sums():
    x = torch.randn(3, input_check._CHUNK + 1001, generator=torch.Generator().manual_seed(0))
    got = input_check._fingerprint([x])[2:].tolist()
    want = _one_pass(x)
    assert all(abs(g - w) <= 1e-9 * max(1.0, abs(w)) for g, w in zip(got, want)), (got, want)


def test_a_swap_across_chunks_changes_the_fingerprint():
    x = torch.randn(2 * input_check._CHUNK + 7, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[[3, input_check._CHUNK + 40]] = y[[input_check._CHUNK + 40, 3]]
    assert not torch.equal(input_check._fingerprint([x]), input_check._fingerprint([y]))


def test_no_temporary_is_larger_than_a_chunk():
    sizes = []
    x = torch.randn(1, 4 * input_check._CHUNK // 64, 64)          # 4 chunks of fp32

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
                sizes.append(out.untyped_storage().nbytes())      # new memory, not a view of the input
            return out
    with Record():
        input_check._fingerprint([x])
    assert max(sizes) <= (input_check._CHUNK + 97) * 8, max(sizes)
