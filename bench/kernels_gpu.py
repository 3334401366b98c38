"""TFLOP/s of seqpar's Triton block-attention kernels against F.scaled_dot_product_attention.

For users with a CUDA GPU (it cannot run on the CPU-only machine the project is developed on,
so the repository ships no figures from it). Causal self-attention over one block, S = 4k…64k:

    python bench/kernels_gpu.py [--quick] [--dtype bf16] [--heads 16] [--kv-heads 16] [--head-dim 128]

prints a table and writes bench/results/kernels_gpu.json.

FLOP count (the convention of the FlashAttention papers; a multiply-add is 2 FLOPs):
  forward  = 2 matmuls (S = Q·Kᵀ, O = P·V), each 2·B·Hq·S·S·D FLOPs      → 4·B·Hq·S²·D
  backward = 5 matmuls (recompute Q·Kᵀ, dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K,
             dK = dSᵀ·Q)                                                → 10·B·Hq·S²·D
  causal   = half of each (only the lower triangle is computed)         → ×0.5
Exponentials and the softmax's elementwise work are not counted. GQA does not change the count:
every query head still attends over S keys.

Shape legend: B batch, Hq query heads, Hkv key/value heads, S sequence length, D head dim.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels_gpu.json")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def attention_flops(B: int, Hq: int, S: int, D: int, causal: bool) -> tuple[float, float]:
    """(forward, backward) FLOPs of attention over S queries and S keys (formula above)."""
    fwd = 4.0 * B * Hq * S * S * D
    if causal:
        fwd *= 0.5
    return fwd, 2.5 * fwd


def _ms(fn) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench flushes L2 between runs)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_one(S: int, args) -> dict:
    """Forward and backward time of our kernels and of SDPA at sequence length S."""
    from seqpar_compiler.kernels import BlockMask
    from seqpar_compiler.kernels.triton_attention import triton_block_backward, triton_block_forward

    dtype, dev = DTYPES[args.dtype], torch.device("cuda")
    B, Hq, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    scale = 1.0 / math.sqrt(D)
    torch.manual_seed(0)
    q = torch.randn(B, Hq, S, D, dtype=dtype, device=dev)                     # (B, Hq, S, D)
    k = torch.randn(B, Hkv, S, D, dtype=dtype, device=dev)                    # (B, Hkv, S, D)
    v = torch.randn(B, Hkv, S, D, dtype=dtype, device=dev)
    dout = torch.randn_like(q)
    mask = BlockMask.of(causal=True)

    out, lse = triton_block_forward(q, k, v, mask, scale)
    row = {"S": S}
    row["ours_fwd_ms"] = _ms(lambda: triton_block_forward(q, k, v, mask, scale))
    row["ours_bwd_ms"] = _ms(lambda: triton_block_backward(dout, q, k, v, out, lse, mask, scale))

    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    gqa = dict(enable_gqa=True) if Hkv != Hq else {}
    ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, **gqa)
    row["max_abs_diff_vs_sdpa"] = (out.float() - ref.detach().float()).abs().max().item()
    row["sdpa_fwd_ms"] = _ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                                    scale=scale, **gqa))
    row["sdpa_bwd_ms"] = _ms(lambda: ref.backward(dout, retain_graph=True))

    fwd_flops, bwd_flops = attention_flops(B, Hq, S, D, causal=True)
    for name in ("ours", "sdpa"):
        row[f"{name}_fwd_tflops"] = fwd_flops / row[f"{name}_fwd_ms"] * 1e-9
        row[f"{name}_bwd_tflops"] = bwd_flops / row[f"{name}_bwd_ms"] * 1e-9
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--quick", action="store_true", help="only S = 4096, 8192")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.seqlens = [S for S in args.seqlens if S <= 8192] or [4096]

    if not torch.cuda.is_available():
        print("bench/kernels_gpu.py needs a CUDA GPU: none is visible to torch "
              f"(torch {torch.__version__}). Nothing was measured; no results were written.")
        return 1
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter would time Python, not the GPU.")
        return 1
    import triton

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"{args.dtype} causal B={args.batch} Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim}")
    header = f"{'S':>6} | {'fwd ours':>9} {'fwd sdpa':>9} | {'bwd ours':>9} {'bwd sdpa':>9} | max|Δout|"
    print(header + "   (TFLOP/s)")
    print("-" * len(header))
    rows = []
    for S in args.seqlens:
        try:
            row = bench_one(S, args)
        except torch.cuda.OutOfMemoryError:
            print(f"{S:>6} | out of memory")
            rows.append({"S": S, "error": "out of memory"})
            torch.cuda.empty_cache()
            continue
        rows.append(row)
        print(f"{S:>6} | {row['ours_fwd_tflops']:9.1f} {row['sdpa_fwd_tflops']:9.1f} | "
              f"{row['ours_bwd_tflops']:9.1f} {row['sdpa_bwd_tflops']:9.1f} | "
              f"{row['max_abs_diff_vs_sdpa']:.1e}")
        torch.cuda.empty_cache()

    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "config": {"dtype": args.dtype, "causal": True, "batch": args.batch, "heads": args.heads,
                   "kv_heads": args.kv_heads, "head_dim": args.head_dim},
        "flops": "fwd = 4*B*Hq*S^2*D * 0.5 (causal); bwd = 2.5 * fwd",
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
