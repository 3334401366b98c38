"""``SEQPAR_KERNEL=auto`` on CUDA: each block goes to the fastest kernel that computes its mask
exactly, forward and backward alike.

The decision is a pure function of the block (its ``BlockMask``, shapes, dtype, device), so
the backward of a block, which sees the same mask and shapes, takes the kernel its forward took.

Decision table (first row that applies):

  | block                                                 | kernel                          |
  |-------------------------------------------------------|---------------------------------|
  | ALiBi, soft-capping, Dv ≠ D, key padding, rel. table  | Triton if it computes them, else math |
  | fp32 (FA2 and cuDNN take fp16/bf16 only), D % 8 ≠ 0   | Triton (math for D > 256)       |
  | packed documents as runs, no window (varlen pairs)    | FA2 varlen                      |
  | full or causal (one call, rows that see nothing cut)  | cuDNN (Hq = Hkv, D ≤ 128), else FA2 |
  | a band (window) that FA2's window sizes reproduce      | FA2                             |
  | anything else (striped windows, documents × window)   | Triton                          |

A GPU older than sm_80, or a torch without the kernel, drops the row to the next kernel.

Shape legend: q [B, Hq, M, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv].
"""
from __future__ import annotations

import functools

import torch

from .block_mask import BlockMask
from .cuda_aten import CUDA_ATEN_DTYPES, DenseCall, VarlenCall, plan_dense_call, plan_varlen_call

__all__ = ["BlockChoice", "choose_cuda_block_kernel", "cuda_aten_kernels"]

BlockChoice = tuple[str, "DenseCall | VarlenCall | None"]


@functools.lru_cache(maxsize=None)
def _available(index: int) -> tuple[bool, bool]:
    capability = torch.cuda.get_device_capability(index)
    if capability < (8, 0):
        return False, False
    cudnn = torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000
    flash = bool(getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)())
    return cudnn, flash


def cuda_aten_kernels(device: torch.device) -> tuple[bool, bool]:
    """(cuDNN attention usable, FA2 usable) on ``device``: sm_80+, cuDNN ≥ 9, a flash build."""
    if device.type != "cuda":
        return False, False
    return _available(device.index if device.index is not None else torch.cuda.current_device())


def _needed_mods(mask: BlockMask, D: int, Dv: int) -> set[str]:
    """What of this block ATen's cuDNN/FA2 kernels cannot compute: ALiBi, soft-capping, Dv ≠ D,
    key padding, a relative-position table."""
    return {name for name, on in (("alibi", mask.alibi_slopes is not None), ("softcap", mask.softcap is not None),
                                  ("dv", Dv != D), ("key_padding", mask.has_padding),
                                  ("rel_bias", mask.rel_bias is not None)) if on}


def _triton_computes(mask: BlockMask, D: int, Dv: int) -> bool:
    """Whether our Triton kernels compute this block's extras; they declare what they compute
    in ``SCORE_MODS``."""
    from . import triton_attention
    return _needed_mods(mask, D, Dv) <= set(getattr(triton_attention, "SCORE_MODS", ()))


def _has_score_mods(mask: BlockMask, D: int, Dv: int) -> bool:
    return bool(_needed_mods(mask, D, Dv))


def choose_cuda_block_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask) -> BlockChoice:
    """(kernel, plan): ``cudnn``/``flash`` with their call plan, or ``triton``/``math`` (no plan)."""
    B, Hq, M, D = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if _has_score_mods(mask, D, Dv):
        return ("triton" if D <= 256 and Dv <= 256 and _triton_computes(mask, D, Dv) else "math"), None
    if q.dtype not in CUDA_ATEN_DTYPES or D % 8 or D > 256:
        return ("triton" if D <= 256 and q.dtype in (torch.float32, *CUDA_ATEN_DTYPES) else "math"), None
    cudnn_ok, flash_ok = cuda_aten_kernels(q.device)
    if mask.has_docs:
        call = plan_varlen_call(mask, B, M, N) if flash_ok else None
        return ("flash", call) if call is not None else ("triton", None)
    call = plan_dense_call(mask, M, N)
    if call is None:
        return "triton", None
    if not call.windowed and cudnn_ok and Hq == Hkv and D <= 128:
        return "cudnn", call
    if flash_ok:
        return "flash", call
    return "triton", None
