"""The Triton launch configs: a deterministic table per GPU generation, head dim and dtype (issue 14)."""
import pytest
import torch

from seqpar_compiler.kernels import triton_configs as tc


def _on(capability, monkeypatch):
    monkeypatch.setattr(tc, "_capability", lambda device: capability)
    return torch.device("cuda", 0)


def test_interpreter_gets_one_small_config_for_every_pass():
    cfg = tc.triton_configs(128, torch.bfloat16, torch.device("cpu"))
    assert cfg.forward == cfg.dkdv == cfg.dq == tc.TileConfig(64, 64, 4, 1)


def test_hopper_bf16_d128_takes_flex_attention_defaults(monkeypatch):
    cfg = tc.triton_configs(128, torch.bfloat16, _on((9, 0), monkeypatch))
    assert cfg.forward == tc.TileConfig(128, 64, 8, 3)
    assert cfg.dkdv == tc.TileConfig(64, 128, 8, 3)       # narrow query tiles against wide key tiles
    assert cfg.dq == tc.TileConfig(128, 64, 8, 3)


def test_ampere_and_hopper_differ_at_d64(monkeypatch):
    hopper = tc.triton_configs(64, torch.float16, _on((9, 0), monkeypatch))
    ampere = tc.triton_configs(64, torch.float16, _on((8, 0), monkeypatch))
    assert hopper.forward == tc.TileConfig(128, 128, 4, 3)
    assert ampere.forward == tc.TileConfig(128, 64, 4, 3)


def test_fp32_keeps_register_sized_tiles_on_every_gpu(monkeypatch):
    for cap in ((8, 0), (9, 0)):
        cfg = tc.triton_configs(128, torch.float32, _on(cap, monkeypatch))
        assert cfg.forward.block_m * cfg.forward.block_n <= 32 * 32


@pytest.mark.parametrize("d_pad", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cap", [(7, 5), (8, 0), (8, 6), (9, 0), (10, 0)])
def test_choice_is_a_pure_function_of_gpu_dim_dtype(monkeypatch, d_pad, dtype, cap):
    dev = _on(cap, monkeypatch)
    first = tc.triton_configs(d_pad, dtype, dev)
    tc._configs.cache_clear()
    again = tc.triton_configs(d_pad, dtype, dev)
    assert first == again
    for c in (first.forward, first.dkdv, first.dq):
        assert c.block_m >= 16 and c.block_n >= 16 and c.num_warps in (4, 8) and c.num_stages >= 1


def test_tuning_space_holds_the_default_and_stays_small():
    for d_pad in (64, 128):
        space = tc.candidate_configs(d_pad, torch.bfloat16)
        assert 4 <= len(space) <= 40
        assert tc.TileConfig(128, 64, 8, 3) in space
