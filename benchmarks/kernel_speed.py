"""Quantized matmul kernels on a GPU: time, TFLOP/s, GB/s and fraction of a measured roofline.

The roofline is measured in the same run: memory bandwidth from a large device-to-device
copy (bytes read + written), compute from a bf16 ``torch.matmul`` at 8192^3 (and
``torch._scaled_mm`` at 8192^3 for fp8). For each kernel and shape the floor time is
max(bytes / bandwidth, flops / peak) with the fewest bytes the op must move (weights,
scales, activations, output once each); ``roofline`` is floor / measured. Times are
medians from ``triton.testing.do_bench`` (CUDA events, L2 flushed before every run).
Each kernel's output is checked against an fp64 reference with bf16 activations first.
Beside each Triton kernel runs torchao's kernel on the same codes and scales where torchao
has the scheme (``kernel=torchao``); ``vs torchao`` is torchao's time over ours.

    python benchmarks/kernel_speed.py --json kernels.json [--shape 1x8192x8192 --shape 2048x8192x8192]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from kernels import formats, metrics, registry  # noqa: E402
from kernels.catalog import Unsupported  # noqa: E402
from kernels.fp8_matmul import fp8_scaled_mm, quantize_fp8_per_token  # noqa: E402

SHAPES = [(1, 8192, 8192), (16, 8192, 8192), (2048, 8192, 8192), (1, 4096, 4096), (16, 4096, 4096),
          (2048, 4096, 4096), (1, 14336, 4096), (16, 14336, 4096), (2048, 14336, 4096), (1, 4096, 14336),
          (2048, 4096, 14336)]
WEIGHTS = {"int4 g128 (W4A16)": ("int4", {"granularity": "per_group", "group_size": 128}),
           "int8 per-channel (W8A16)": ("int8", {"granularity": "per_channel"}),
           "mxfp4": ("mxfp4", {}), "nvfp4": ("nvfp4", {}), "mxfp8_e4m3": ("mxfp8_e4m3", {}),
           "fp8 W8A8 per-row": ("fp8_e4m3", {"granularity": "per_channel"})}
FP8_KNOBS = {"fmt": "fp8_e4m3", "granularity": "per_channel", "group_size": 128, "rounding": "nearest",
             "scale_rule": None, "overflow": "saturate", "symmetric": True, "seed": 0}


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def roofline() -> dict:
    big = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")  # 1 GiB
    dst = torch.empty_like(big)
    copy_ms = bench_ms(lambda: dst.copy_(big))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench_ms(lambda: a @ b)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    fp8_ms = bench_ms(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    flops = 2 * 8192 ** 3
    return {"copy_gbps": 2 * big.numel() / copy_ms / 1e6, "bf16_tflops": flops / mm_ms / 1e9,
            "fp8_tflops": flops / fp8_ms / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=Path("kernels.json"))
    ap.add_argument("--shape", action="append", type=lambda v: tuple(int(d) for d in v.split("x")),
                    help="MxNxK to run instead of the default list (repeatable), e.g. the targets' 1x8192x8192")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_speed.py times the kernels on a CUDA GPU, and there is none here; "
                 "benchmarks/kernel_sass.py reads their SASS for one without it")
    roof = roofline()
    print(f"roofline: copy {roof['copy_gbps']:.0f} GB/s, bf16 matmul {roof['bf16_tflops']:.0f} TFLOP/s, "
          f"fp8 _scaled_mm {roof['fp8_tflops']:.0f} TFLOP/s")
    rows = []
    gen = torch.Generator().manual_seed(0)
    for m, n, k in args.shape or SHAPES:
        x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
        w = torch.randn(n, k, generator=gen).to("cuda")
        flops = 2 * m * n * k
        w_bf16 = w.to(torch.bfloat16)
        base_ms = bench_ms(lambda: x @ w_bf16.T)
        act_out_bytes = 2 * m * k + 2 * m * n
        rows.append({"kernel": "bf16 torch.matmul", "m": m, "n": n, "k": k, "ms": base_ms,
                     "bytes": 2 * n * k + act_out_bytes, "peak": roof["bf16_tflops"], "rel_error": 0.0})
        for label, (fmt, knobs) in WEIGHTS.items():
            q = formats.quantize(w, fmt, **knobs)
            input_knobs = FP8_KNOBS if fmt == "fp8_e4m3" else None
            peak = roof["fp8_tflops"] if fmt == "fp8_e4m3" else roof["bf16_tflops"]
            timed, errors = {}, {}
            for name in ("triton", "torchao"):
                kernel = registry.get_kernel(name)
                try:
                    y = kernel(x, q, None, input_knobs)
                except Unsupported as e:
                    print(f"{name} {label}: unsupported: {e}", file=sys.stderr)
                    continue
                errors[name] = metrics.relative_error(registry.reference_fp64(x, q, input_knobs), y)
                timed[name] = bench_ms(lambda: kernel(x, q, None, input_knobs))
                rows.append({"kernel": f"{name} {label}", "m": m, "n": n, "k": k, "ms": timed[name],
                             "bytes": q.nbytes + act_out_bytes, "peak": peak, "rel_error": errors[name],
                             "speedup_vs_bf16": base_ms / timed[name]})
            if "triton" in timed and "torchao" in timed:
                rows[-2]["vs_torchao"] = timed["torchao"] / timed["triton"]
            if fmt == "fp8_e4m3":
                xq, sx = quantize_fp8_per_token(x)
                gemm_ms = bench_ms(lambda: fp8_scaled_mm(xq, sx, q, torch.bfloat16))
                wt = q.codes.view(torch.float8_e4m3fn).view(n, k).t()
                sw = q.scales.view(1, n)
                ref_ms = bench_ms(lambda: torch._scaled_mm(xq, wt, scale_a=sx.view(m, 1), scale_b=sw,
                                                           out_dtype=torch.bfloat16))
                rows.append({"kernel": "triton fp8 GEMM only", "m": m, "n": n, "k": k, "ms": gemm_ms,
                             "bytes": n * k + m * k + 2 * m * n, "peak": roof["fp8_tflops"], "rel_error": errors["triton"],
                             "vs_scaled_mm": ref_ms / gemm_ms})
                rows.append({"kernel": "torch._scaled_mm (rowwise)", "m": m, "n": n, "k": k, "ms": ref_ms,
                             "bytes": n * k + m * k + 2 * m * n, "peak": roof["fp8_tflops"], "rel_error": float("nan")})
        for r in rows:
            if r["m"] == m and r["n"] == n and r["k"] == k:
                r["tflops"] = flops / r["ms"] / 1e9
                r["gbps"] = r["bytes"] / r["ms"] / 1e6
                floor_ms = max(r["bytes"] / roof["copy_gbps"] / 1e6, flops / r["peak"] / 1e9)
                r["roofline"] = floor_ms / r["ms"]
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, **roof}
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("| kernel | M | N | K | ms | TFLOP/s | GB/s | roofline | vs bf16 | vs torchao | vs _scaled_mm "
          "| rel err (bf16 acts) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in rows:
        print(f"| {r['kernel']} | {r['m']} | {r['n']} | {r['k']} | {r['ms']:.4f} | {r['tflops']:.1f} | {r['gbps']:.0f} | "
              f"{r['roofline']:.0%} | {r.get('speedup_vs_bf16', nan):.2f} | {r.get('vs_torchao', nan):.2f} | "
              f"{r.get('vs_scaled_mm', nan):.2f} | "
              f"{r['rel_error']:.1e} |")


if __name__ == "__main__":
    main()
