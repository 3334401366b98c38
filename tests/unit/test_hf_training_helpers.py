"""seqpar_compiler.hf pieces that need no process group (issue 22); the clients run end to end in
tests/dist/test_hf_training.py."""
import torch

from seqpar_compiler import hf as sp_hf


class _Base:
    def __init__(self, *args, **kwargs):
        self.data_collator = None


class _TakesPositions(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return input_ids


class _NoPositions(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None):
        return input_ids


def test_sequence_parallel_puts_the_mixin_first_and_returns_one_class_per_trainer():
    made = sp_hf.sequence_parallel(_Base)
    assert made is sp_hf.sequence_parallel(_Base) and made.__mro__[1:3] == (sp_hf.SequenceParallelMixin, _Base)
    assert sp_hf.sequence_parallel(made) is made


def test_one_process_is_one_group_of_one():
    assert tuple(sp_hf.group_data_parallel()) == (1, 0)


def test_an_all_ones_mask_is_dropped_and_positions_added_for_a_model_that_takes_them():
    ids = torch.arange(12).view(2, 6)
    out = sp_hf._without_trivial_mask({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, _TakesPositions())
    assert "attention_mask" not in out and torch.equal(out["position_ids"], torch.arange(6).expand(2, 6))
    out = sp_hf._without_trivial_mask({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, _NoPositions())
    assert set(out) == {"input_ids"}


def test_a_mask_with_padding_is_kept_as_it_is():
    ids = torch.arange(12).view(2, 6)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    assert sp_hf._without_trivial_mask(batch, _TakesPositions()) is batch
