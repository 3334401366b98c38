"""Block attention kernels: one (query chunk, key chunk) block → (out, lse), and its backward.

No communication and no knowledge of rings or graphs lives here (docs/architecture.md). The ring calls
``block_attention_forward`` / ``block_attention_backward`` with a ``BlockMask`` that states the
block's global positions, its ``AttentionSpec`` and its per-token data; the kernel decides how
to evaluate it.

Kernels (``SEQPAR_KERNEL``):
  aten    ATen's CPU flash kernel (CPU tensors; fp32, fp64, bf16, fp16)
  triton  our Triton flash kernels (CUDA; CPU tensors only under TRITON_INTERPRET=1)
  math    plain tensor math, tiled over query rows (any device and dtype)
  auto    aten on CPU; on CUDA (fp32/fp16/bf16) per block: cuDNN, FA2 or Triton, whichever is
          fastest and computes the block's mask exactly (``cuda_dispatch.py``, its decision
          table); math otherwise

Every block-kernel call is reported to a hook (``set_kernel_call_hook``) with the concrete
kernel and direction: ``runtime/stats.py`` counts them (``stats().kernel_calls``). A hook,
because this layer sits below the runtime and may not import it (docs/architecture.md).

Shape legend: B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0), M query rows,
N key rows, D head dim. ``lse`` is [B, Hq, M] in fp32 (fp64 for fp64 inputs), natural log;
a row that sees no key has out = 0, lse = -inf.
"""
from __future__ import annotations

import os

import torch

from .attention_spec import AttentionSpec
from .aten_cpu import ATEN_DTYPES, aten_block_backward, aten_block_forward
from .cuda_aten import aten_cuda_backward, aten_cuda_forward
from .cuda_dispatch import choose_cuda_block_kernel
from .block_mask import BlockKind, BlockMask, classify_block, plan_tiles, visible_key_range
from .math_attention import math_block_backward, math_block_forward

__all__ = [
    "AUTO_CUDA",
    "AttentionSpec",
    "BlockKind",
    "BlockMask",
    "KERNELS",
    "block_attention_backward",
    "block_attention_forward",
    "classify_block",
    "resolve_kernel",
    "set_kernel_call_hook",
    "visible_key_range",
    "plan_tiles",
]

KERNELS = ("auto", "aten", "triton", "math")
# The resolved name of ``auto`` on CUDA: the kernel is chosen per block.
AUTO_CUDA = "auto-cuda"

_kernel_call_hook = None


def set_kernel_call_hook(hook) -> None:
    """``hook(kernel, direction)`` is called once per block-kernel call (None: no hook)."""
    global _kernel_call_hook
    _kernel_call_hook = hook


def _called(kernel: str, direction: str) -> None:
    if _kernel_call_hook is not None:
        _kernel_call_hook(kernel, direction)


def resolve_kernel(kernel: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete kernel for a choice and the tensors' device and dtype; a clear error when
    the choice cannot run here."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
    if kernel == "auto":
        if device.type == "cpu" and dtype in ATEN_DTYPES:
            return "aten"
        if device.type == "cuda" and dtype in (torch.float32, torch.float16, torch.bfloat16):
            return AUTO_CUDA
        return "math"
    if kernel == "aten" and (device.type != "cpu" or dtype not in ATEN_DTYPES):
        raise ValueError(f"kernel 'aten' runs on CPU tensors of dtype {', '.join(map(str, ATEN_DTYPES))}; "
                         f"got {device.type} {dtype}")
    if kernel == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernel 'triton' on CPU tensors needs the Triton interpreter: set "
                         "TRITON_INTERPRET=1 before importing triton (or use kernel 'aten' or 'math')")
    return kernel


def block_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask,
                            scale: float, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B,Hq,M,D], k/v [B,Hkv,N,D] → out [B,Hq,M,D] (q's dtype), lse [B,Hq,M] (fp32).

    ``kernel`` is a resolved name (see ``resolve_kernel``).
    """
    plan = None
    if kernel == AUTO_CUDA:
        kernel, plan = choose_cuda_block_kernel(q, k, v, mask)
    _called(kernel, "forward")
    if kernel in ("cudnn", "flash"):
        return aten_cuda_forward(kernel, q, k, v, plan, scale)
    if kernel == "aten":
        return aten_block_forward(q, k, v, mask, scale)
    if kernel == "triton" and mask.rel_bias is None:        # no relative-position table in Triton
        from .triton_attention import triton_block_forward
        return triton_block_forward(q, k, v, mask, scale)
    return math_block_forward(q, k, v, mask, scale)


def block_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, mask: BlockMask, scale: float,
                             kernel: str, dlse: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block, given the merged (out, lse) of the whole attention.

    Returns dq [B,Hq,M,D], dk/dv [B,Hkv,N,D] in fp32 (fp64 for fp64 inputs). A gradient on
    the lse (``dlse`` [B,Hq,M]) and a learned relative-position table's gradient
    (``mask.rel_bias_grad``, accumulated in place) are taken by the math kernel only.
    """
    if dlse is not None or mask.rel_bias_grad is not None:      # only the math kernel forms ds
        _called("math", "backward")
        return math_block_backward(dout, q, k, v, out, lse, mask, scale, dlse)
    plan = None
    if kernel == AUTO_CUDA:           # the same choice as the block's forward: same mask and shapes
        kernel, plan = choose_cuda_block_kernel(q, k, v, mask)
    _called(kernel, "backward")
    if kernel in ("cudnn", "flash"):
        return aten_cuda_backward(kernel, dout, q, k, v, out, lse, plan, scale)
    if kernel == "aten":
        return aten_block_backward(dout, q, k, v, out, lse, mask, scale)
    if kernel == "triton" and mask.rel_bias is None:
        from .triton_attention import triton_block_backward
        return triton_block_backward(dout, q, k, v, out, lse, mask, scale)
    return math_block_backward(dout, q, k, v, out, lse, mask, scale)
