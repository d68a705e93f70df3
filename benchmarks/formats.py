"""fake_quant throughput per format on a 4096x4096 fp32 tensor, against a native fp8 cast.

Prints a markdown table and writes JSON. The baseline, ``x.to(torch.float8_e4m3fn)``, is
timed in the same run on the same tensor, so the ratio column compares like with like.

    python benchmarks/formats.py                 # CPU
    python benchmarks/formats.py --device cuda   # GPU (times with CUDA events)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels import formats, metrics  # noqa: E402
from kernels.catalog import FORMATS, BlockSpec  # noqa: E402


def timed_ms(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=Path("formats.json"))
    args = ap.parse_args()

    x = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)).to(args.device)
    elements = x.numel()
    base_ms = timed_ms(lambda: x.to(torch.float8_e4m3fn), args.device, args.repeats)
    rows = [{"format": "native x.to(float8_e4m3fn)", "ms": base_ms, "gelem_per_s": elements / base_ms / 1e6,
             "vs_native_cast": 1.0}]
    for name, spec in FORMATS.items():
        knobs = {} if isinstance(spec, BlockSpec) else {"granularity": "per_group", "group_size": 128}
        ms = timed_ms(lambda: formats.fake_quant(x, name, **knobs), args.device, args.repeats)
        q = formats.quantize(x, name, **knobs)
        rows.append({"format": name, "knobs": knobs, "ms": ms, "gelem_per_s": elements / ms / 1e6,
                     "vs_native_cast": ms / base_ms, "bits_per_element": q.bits_per_element,
                     "sqnr_db": metrics.sqnr_db(x, q.dequantize())})

    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "shape": list(x.shape)}
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"fake_quant on {args.size}x{args.size} fp32, {meta['device']}, torch {meta['torch']}, "
          f"{meta['threads']} threads, median of {args.repeats}")
    print("| format | ms | Gelem/s | time vs native fp8 cast | bits/elem | SQNR dB (N(0,1)) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['ms']:.1f} | {r['gelem_per_s']:.3f} | {r['vs_native_cast']:.1f}x | "
              f"{r.get('bits_per_element', 8):.3f} | {r.get('sqnr_db', float('nan')):.1f} |")


if __name__ == "__main__":
    main()
