"""seqpar::rank_dropout on one process (no group: rank 0): the dropout op of a shard."""
import pytest
import torch

from seqpar_compiler.runtime.rank_dropout import rank_dropout_op


def test_kept_elements_are_scaled_and_the_gradient_uses_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(4, 64, 8, dtype=torch.float64, requires_grad=True)
    out, keep = rank_dropout_op(x, 0.25, "")
    assert keep.dtype == torch.bool and 0.6 < keep.float().mean() < 0.9
    torch.testing.assert_close(out, x.detach() * keep / 0.75)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, keep.double() / 0.75)


def test_the_shared_random_state_decides_the_mask_and_moves_on():
    torch.manual_seed(7)
    a = rank_dropout_op(torch.ones(1000), 0.5, "")[1]
    b = rank_dropout_op(torch.ones(1000), 0.5, "")[1]
    torch.manual_seed(7)
    again = rank_dropout_op(torch.ones(1000), 0.5, "")[1]
    assert torch.equal(a, again) and not torch.equal(a, b)


def test_p_one_drops_everything_and_a_bad_p_is_refused():
    out, keep = rank_dropout_op(torch.ones(3, 5), 1.0, "")
    assert not out.any() and not keep.any()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rank_dropout_op(torch.ones(3), 1.5, "")
