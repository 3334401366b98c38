"""One GPU check for maintainers: run by ``bench/gpu_check.sh`` on any CUDA machine,
offline, with only torch, triton and transformers installed, in at most 8 minutes.

Sections (each timed, each failure recorded and the rest still run):
  kernels   every block kind through ``SEQPAR_KERNEL=auto``'s per-block dispatch (cuDNN, FA2,
            Triton) forward and backward against float64, and which kernel each took
  pytest    the ``cuda``-marked tests, when pytest is installed (skipped, and said so, otherwise)
  ring      the ring on 2 and 4 processes sharing the GPU (gloo, transfers staged through pinned
            host memory): fp32 within 1e-5 of float64, bf16 within 2× single-device SDPA's bf16
            error, every schedule × mask kind
  llama     an HF Llama compiled with seqpar on 2 ranks against the same model on one GPU
  table     TFLOP/s per block kind: ours (Triton) / cuDNN / FA2, bf16, D=128
  ring_speed the ring on P ranks as a fraction of one SDPA call over the whole sequence

Writes ``bench/results/gpu_check.json`` and ``bench/results/gpu_check_summary.md``.
``--cpu-dry-run`` runs the same logic on CPU tensors at tiny shapes (aten kernels; no table),
to check the script where no GPU is at hand.

Shape legend: B batch, Hq query heads, Hkv key/value heads, S global sequence length,
S_local = S / P, D head dim.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))          # reference.py
RESULTS = os.path.join(HERE, "results")
SCHEDULES = ("ring", "zigzag", "striped", "distflash")
MASKS = {"full": dict(), "causal": dict(causal=True), "window": dict(causal=True, window=48),
         "docs": dict(causal=True, docs=True)}


def _device(dry: bool) -> torch.device:
    if dry:
        return torch.device("cpu")
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def _rel(x, ref) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------- kernels


def kernel_section(dry: bool) -> dict:
    """Each block kind through the CUDA per-block dispatch: kernel taken, error vs float64."""
    from reference import reference_attention
    from seqpar_compiler import stats
    from seqpar_compiler.kernels import BlockMask, block_attention_backward, block_attention_forward, resolve_kernel
    dev = _device(dry)
    blocks = {
        "full": (256, 256, dict()), "causal": (256, 256, dict(causal=True)),
        "causal_past": (256, 256, dict(causal=True, q_start=512)),
        "striped": (128, 128, dict(causal=True, q_start=1, q_stride=4, k_start=2, k_stride=4)),
        "window": (256, 256, dict(causal=True, window=64, q_start=256, k_start=128)),
        "docs": (256, 256, dict(causal=True)), "docs_window": (256, 256, dict(causal=True, window=64)),
    }
    out = {}
    for dtype in ((torch.float32,) if dry else (torch.bfloat16, torch.float32)):
        kernel = resolve_kernel("auto", dev, dtype)
        for hq, hkv in ((4, 4), (4, 2)):
            for name, (M, N, kw) in blocks.items():
                g = torch.Generator().manual_seed(0)
                q = torch.randn(2, hq, M, 128, generator=g, dtype=torch.float64)
                k, v = (torch.randn(2, hkv, N, 128, generator=g, dtype=torch.float64) for _ in range(2))
                dout = torch.randn(2, hq, M, 128, generator=g, dtype=torch.float64)
                qp = kw.get("q_start", 0) + torch.arange(M) * kw.get("q_stride", 1)
                kp = kw.get("k_start", 0) + torch.arange(N) * kw.get("k_stride", 1)
                docs = name.startswith("docs")
                qd, kd = ((qp // 48)[None].expand(2, M), (kp // 48)[None].expand(2, N)) if docs else (None, None)
                q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
                ro, rl = reference_attention(q64, k64, v64, scale=128 ** -0.5, causal=kw.get("causal", False),
                                             window=kw.get("window"), doc_ids=qd, k_doc=kd, q_pos=qp, k_pos=kp)
                ro.backward(dout)
                mask = BlockMask.of(q_doc=None if qd is None else qd.to(dev), k_doc=None if kd is None else kd.to(dev),
                                 **kw)
                qx, kx, vx, dx = (t.to(dev, dtype) for t in (q, k, v, dout))
                with stats() as s:
                    o, l = block_attention_forward(qx, kx, vx, mask, 128 ** -0.5, kernel)
                    grads = block_attention_backward(dx, qx, kx, vx, o, l, mask, 128 ** -0.5, kernel)
                errs = {"out": _rel(o, ro), "dq": _rel(grads[0], q64.grad), "dk": _rel(grads[1], k64.grad),
                        "dv": _rel(grads[2], v64.grad)}
                key = f"{str(dtype)[6:]}/{name}/{'gqa' if hq != hkv else 'mha'}"
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                out[key] = {"kernels": s.kernel_calls, "errors": errs, "ok": max(errs.values()) < tol}
    return out


# ----------------------------------------------------------------------------- ring on P ranks


def _ring_case(rank, P, dev, schedule, mask, dtype):
    import seqpar_compiler as sp
    from reference import reference_attention
    from seqpar_compiler.runtime import local_positions
    S, B, Hq, Hkv, D = 128 * P, 2, 4, 2, 64
    g = torch.Generator().manual_seed(3)
    q, dout = (torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    kw = dict(MASKS[mask])
    doc = torch.sort(torch.randint(0, 5, (B, S), generator=g), dim=1).values if kw.pop("docs", False) else None
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref, _ = reference_attention(q64, k64, v64, doc_ids=doc, **kw)
    ref.backward(dout)
    idx = local_positions(schedule, rank, P, S)
    ql, kl, vl = (t[:, :, idx].to(dev, dtype).requires_grad_() for t in (q, k, v))
    o = sp.ring_attention(ql, kl, vl, schedule=schedule, doc_ids=None if doc is None else doc[:, idx].to(dev), **kw)
    o.backward(dout[:, :, idx].to(dev, dtype))
    res = {"out": _rel(o, ref[:, :, idx]), "dq": _rel(ql.grad, q64.grad[:, :, idx]),
           "dk": _rel(kl.grad, k64.grad[:, :, idx]), "dv": _rel(vl.grad, v64.grad[:, :, idx])}
    if dtype != torch.float32 and doc is None and "window" not in kw:
        qs, ks, vs = (t.to(dev, dtype).requires_grad_() for t in (q, k, v))
        so = F.scaled_dot_product_attention(qs, ks, vs, is_causal=kw.get("causal", False), enable_gqa=True)
        so.backward(dout.to(dev, dtype))
        res["sdpa"] = {"out": _rel(so, ref), "dq": _rel(qs.grad, q64.grad), "dk": _rel(ks.grad, k64.grad),
                       "dv": _rel(vs.grad, v64.grad)}
    return res


def ring_worker(rank, P, dry: bool) -> dict:
    dev = _device(dry)
    dtypes = (torch.float32,) if dry else (torch.float32, torch.bfloat16)
    return {f"{str(dt)[6:]}/{s}/{m}": _ring_case(rank, P, dev, s, m, dt)
            for dt in dtypes for s in SCHEDULES for m in MASKS}


def ring_section(dry: bool) -> dict:
    from seqpar_compiler.launch import run_ranks
    out = {}
    for P in (2,) if dry else (2, 4):
        per_rank = run_ranks(ring_worker, P, dry, timeout=240)
        for case in per_rank[0]:
            worst = {t: max(r[case][t] for r in per_rank) for t in ("out", "dq", "dk", "dv")}
            entry = {"errors": worst}
            if "sdpa" in per_rank[0][case]:
                sdpa = per_rank[0][case]["sdpa"]
                entry["sdpa"] = sdpa
                entry["ok"] = all(worst[t] <= 2 * sdpa[t] + 1e-6 for t in worst)
            elif case.startswith("float32"):
                entry["ok"] = max(worst.values()) < 1e-5
            else:
                entry["ok"] = max(worst.values()) < 3e-2        # no SDPA baseline for windows/documents
            out[f"P{P}/{case}"] = entry
    return out


# ----------------------------------------------------------------------------- HF Llama on 2 ranks


def llama_worker(rank, P, dry: bool) -> dict:
    import transformers
    import seqpar_compiler as sp
    dev = _device(dry)
    S = 64 if dry else 2048
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128 if dry else 512, intermediate_size=256 if dry else 1024,
                                   num_hidden_layers=2, num_attention_heads=4 if dry else 8, num_key_value_heads=2,
                                   max_position_embeddings=S, attn_implementation="sdpa")
    m = transformers.LlamaForCausalLM(cfg).to(dev)
    ref = transformers.LlamaForCausalLM(cfg).to(dev)
    ref.load_state_dict(m.state_dict())
    idx = torch.randint(0, 512, (2, S), generator=torch.Generator().manual_seed(1)).to(dev)
    torch._dynamo.reset()
    with sp.stats() as st:
        out = torch.compile(m, backend=sp.backend(inner="aot_eager" if dry else "inductor",
                                                 schedule="zigzag"))(idx, labels=idx,
                                                                                             use_cache=False)
        out.loss.backward()
    r = ref(idx, labels=idx, use_cache=False)
    r.loss.backward()
    grads = [_rel(p.grad, q.grad) for p, q in zip(m.parameters(), ref.parameters()) if q.grad is not None]
    return {"loss": _rel(out.loss, r.loss), "max_grad_rel_err": max(grads), "ring_calls": st.attention_forward_calls,
            "kernel_calls": st.kernel_calls}


def llama_section(dry: bool) -> dict:
    from seqpar_compiler.launch import run_ranks
    res = run_ranks(llama_worker, 2, dry, timeout=300)
    worst = {k: max(r[k] for r in res) for k in ("loss", "max_grad_rel_err")}
    return {"per_rank": res, **worst, "ok": worst["loss"] < 1e-4 and worst["max_grad_rel_err"] < 1e-3}


# ----------------------------------------------------------------------------- speed


def _ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def table_section(dry: bool, S: int = 16384) -> dict:
    """TFLOP/s per block kind, bf16, B=1, Hq=Hkv=16, D=128: ours (Triton), cuDNN, FA2."""
    if dry:
        return {"skipped": "needs CUDA"}
    from seqpar_compiler.kernels import BlockMask
    from seqpar_compiler.kernels import cuda_aten, triton_attention
    dev, D, H = _device(False), 128, 16
    q, k, v, do = (torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
    rows = {}
    for kind, mask, frac in (("full", BlockMask.of(), 1.0), ("causal", BlockMask.of(causal=True), 0.5),
                             ("window4096", BlockMask.of(causal=True, window=4096), 4096 / S)):
        fl = 4.0 * H * S * S * D * frac
        call = cuda_aten.plan_dense_call(mask, S, S)
        cands = {"triton": (lambda m=mask: triton_attention.triton_block_forward(q, k, v, m, D ** -0.5),
                            lambda m=mask, o=None: None)}
        if call is not None and not call.windowed:
            cands["cudnn"] = (lambda c=call: cuda_aten.aten_cuda_forward("cudnn", q, k, v, c, D ** -0.5), None)
        if call is not None:
            cands["flash"] = (lambda c=call: cuda_aten.aten_cuda_forward("flash", q, k, v, c, D ** -0.5), None)
        row = {}
        for name, (fwd, _) in cands.items():
            try:
                o, lse = fwd()
                t_f = _ms(fwd)
                if name == "triton":
                    bwd = lambda m=mask: triton_attention.triton_block_backward(do, q, k, v, o, lse, m, D ** -0.5)  # noqa: E731
                else:
                    bwd = lambda c=call, n=name: cuda_aten.aten_cuda_backward(n, do, q, k, v, o, lse, c, D ** -0.5)  # noqa: E731
                t_b = _ms(bwd)
                row[name] = {"fwd_tflops": fl / t_f / 1e9, "bwd_tflops": 2.5 * fl / t_b / 1e9}
            except Exception as err:  # noqa: BLE001
                row[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        rows[kind] = row
    return {"S": S, "D": D, "H": H, "dtype": "bf16", "rows": rows}


def ring_speed_worker(rank, P, S: int) -> dict:
    import torch.distributed as dist
    import seqpar_compiler as sp
    dev = _device(False)
    H, D = 16, 128
    q, k, v, do = (torch.randn(1, H, S // P, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(4))

    def step():
        sp.ring_attention(q, k, v, causal=True).backward(do)
    step()
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    return (time.perf_counter() - t0) / 3


def ring_speed_section(dry: bool, S: int = 16384) -> dict:
    if dry:
        return {"skipped": "needs CUDA"}
    from seqpar_compiler.launch import run_ranks
    dev = _device(False)
    q, k, v, do = (torch.randn(1, 16, S, 128, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(4))
    sdpa = _ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)) / 1e3
    out = {"S": S, "sdpa_fwd_bwd_s": sdpa}
    for P in (2, 4):
        t = max(run_ranks(ring_speed_worker, P, S, timeout=200))
        out[f"P{P}"] = {"ring_fwd_bwd_s": t, "fraction_of_one_sdpa": sdpa / t}
    return out


# ----------------------------------------------------------------------------- driver


def pytest_section(dry: bool) -> dict:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"skipped": "pytest is not installed"}
    import subprocess
    args = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "cuda",
            "tests/kernels", "tests/dist/test_ring_triton.py"]
    if dry:
        return {"skipped": "dry run", "would_run": " ".join(args[1:])}
    r = subprocess.run(args, cwd=os.path.join(HERE, ".."), capture_output=True, text=True, timeout=240)
    return {"returncode": r.returncode, "tail": r.stdout[-1500:], "ok": r.returncode == 0}


SECTIONS = {"kernels": kernel_section, "pytest": pytest_section, "ring": ring_section, "llama": llama_section,
            "table": table_section, "ring_speed": ring_speed_section}


def _summary(report: dict) -> str:
    lines = [f"# GPU check ({report['device']}, torch {report['torch']}, triton {report['triton']})", ""]
    for name, sec in report["sections"].items():
        status = sec.get("error") and "ERROR" or sec.get("skipped") and f"skipped ({sec['skipped']})" or "ran"
        lines.append(f"- **{name}** ({sec.get('seconds', 0):.0f} s): {status}")
        res = sec.get("result", {})
        if isinstance(res, dict):
            bad = [k for k, v in res.items() if isinstance(v, dict) and v.get("ok") is False]
            if name in ("kernels", "ring"):
                lines.append(f"  - {sum(1 for v in res.values() if isinstance(v, dict) and v.get('ok'))} ok, "
                             f"{len(bad)} failed{': ' + ', '.join(bad[:12]) if bad else ''}")
    table = report["sections"].get("table", {}).get("result", {}).get("rows")
    if table:
        lines += ["", "| block | kernel | fwd TFLOP/s | bwd TFLOP/s |", "|---|---|---|---|"]
        for kind, row in table.items():
            for k, v in row.items():
                lines.append(f"| {kind} | {k} | {v.get('fwd_tflops', float('nan')):.0f} | "
                             f"{v.get('bwd_tflops', float('nan')):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on CPU tensors, no timings")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--budget", type=float, default=450.0, help="seconds; later sections are skipped past it")
    parser.add_argument("--out", default=os.path.join(RESULTS, "gpu_check.json"))
    args = parser.parse_args()
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --cpu-dry-run to check the script on CPU", file=sys.stderr)
        return 2
    import triton
    report = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(0), "torch": torch.__version__,
              "triton": triton.__version__, "dry_run": dry, "sections": {}}
    start = time.perf_counter()
    for name in args.sections:
        if time.perf_counter() - start > args.budget:
            report["sections"][name] = {"skipped": "time budget spent"}
            continue
        t0 = time.perf_counter()
        try:
            result = SECTIONS[name](dry)
            entry = {"result": result}
            if isinstance(result, dict) and "skipped" in result:
                entry["skipped"] = result["skipped"]
        except Exception as err:  # noqa: BLE001 - record and run the other sections
            entry = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        entry["seconds"] = time.perf_counter() - t0
        report["sections"][name] = entry
        print(f"gpu_check: {name} done in {entry['seconds']:.0f} s" + (" (ERROR)" if "error" in entry else ""),
              flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2, default=str)
    summary = _summary(report)
    with open(os.path.splitext(args.out)[0] + "_summary.md", "w") as f:
        f.write(summary)
    print(summary)
    failed = any("error" in s or any(isinstance(v, dict) and v.get("ok") is False
                                     for v in (s.get("result") or {}).values()) for s in report["sections"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
