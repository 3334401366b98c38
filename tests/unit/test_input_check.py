"""The same-batch check's fingerprint: complex buffers (issue 12) and fake inputs (issue 13)."""
import warnings

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from seqpar_compiler import input_check


def test_complex_buffer_is_fingerprinted_by_both_parts_without_a_warning():
    freqs = torch.polar(torch.ones(8, 4), torch.randn(8, 4))
    other_imag = torch.complex(freqs.real, -freqs.imag)          # same real part
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # casting complex -> real warns
        a = input_check._fingerprint([freqs])
        b = input_check._fingerprint([other_imag])
    assert not torch.equal(a, b), "the imaginary part must count"
    assert torch.equal(a, input_check._fingerprint([freqs.clone()]))


def test_fake_inputs_skip_the_check_and_do_no_collective(monkeypatch):
    """DDPOptimizer calls the backend on graph pieces whose example inputs are fake tensors."""
    def no_collective(*args, **kwargs):
        raise AssertionError("a collective ran on fake inputs")
    monkeypatch.setattr(input_check, "control_all_reduce_max", no_collective)
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(torch.randn(2, 8)), torch.empty(3, 4), 5]
        assert not input_check.inputs_have_data(args)
        input_check.check_same_inputs(args, group=None)
    input_check.check_same_inputs([torch.empty(2, device="meta")], group=None)


def test_real_inputs_do_reach_the_collective(monkeypatch):
    calls = []
    monkeypatch.setattr(input_check, "control_all_reduce_max", lambda t, group: calls.append(t) or t)
    input_check.check_same_inputs([torch.randn(3)], group=None)
    assert len(calls) == 2
