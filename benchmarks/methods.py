"""RTN against GPTQ on the tiny model, weight-only, at int4 g128, int3 g128, MXFP4 and NVFP4.

Each cell is a real trial (``jobs.trial.run``, in this process, on the CPU): the fp32 tiny
model quantized by the method on the default calibration data (128 windows of 512 tokens of
the train split), then scored on the held-out text against the unquantized model. Reported per
cell: perplexity and its increase over the unquantized model (paired over eval windows, with
its standard error), KL and top-1 against it, the mean per-layer output error on the
calibration inputs, and the method's time. Per format, GPTQ's perplexity against RTN's, paired
window by window: the comparison a researcher reads.

The published shape (GPTQ's README, LLaMA-7B WikiText-2): RTN 6.29 vs GPTQ 6.09 at 4 bits, 25.5
vs 8.07 at 3 bits; GPTQ below RTN, the gap much larger at 3 bits.

    python benchmarks/methods.py --json methods.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FORMATS = {"int4 g128": ("dtype=int4",), "int3 g128": ("dtype=int3",), "mxfp4": ("dtype=mxfp4",),
           "nvfp4": ("dtype=nvfp4",)}
METHODS = {"rtn": ("method=rtn",), "gptq": ("method=gptq",),
           "gptq act-order": ("method=gptq", "method.gptq.act_order=true")}


def run(overrides: tuple[str, ...]) -> dict:
    from jobs import trial
    from orchestrator.compose import compose
    from orchestrator.pairing import parse_windows
    from orchestrator.plan import trial_spec

    result = trial.run(trial_spec(compose(*overrides), list(overrides)))
    if result.status.value != "FINISHED":
        raise SystemExit(f"{overrides}: {result.status.value}: {result.reason}")
    return {"metrics": result.metrics, "windows": parse_windows(result.artifacts["eval_windows.csv"])}


def against(windows: dict, base_nll: list[float]) -> dict:
    """Perplexity delta and its paired standard error against per-window NLLs ``base_nll``."""
    from orchestrator.pairing import paired_deltas

    out = paired_deltas(windows, {"nll": base_nll})
    ppl, base = (math.exp(statistics.fmean(v)) for v in (windows["nll"], base_nll))
    return {"perplexity_delta": ppl - base, "perplexity_delta_stderr": out["perplexity_delta_stderr"],
            "within_noise": bool(out["perplexity_delta_within_noise"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every cell (e.g. calib.num_sequences=32)")
    args = parser.parse_args()

    cells = []
    for fmt in args.formats:
        by_method = {}
        for method, overrides in METHODS.items():
            started = time.perf_counter()
            out = run((*FORMATS[fmt], *overrides, *args.extra))
            m, w = out["metrics"], out["windows"]
            by_method[method] = w
            cell = {"format": fmt, "method": method, "perplexity": m["perplexity"],
                    "perplexity_stderr": m["perplexity_stderr"], **against(w, w["reference_nll"]),
                    "kl_divergence": m["kl_divergence"], "kl_divergence_stderr": m["kl_divergence_stderr"],
                    "top1_agreement": m["top1_agreement"], "layer_output_error_mean": m.get("layer_output_error_mean"),
                    "layer_output_error_rtn_mean": m.get("layer_output_error_rtn_mean"),
                    "quantize_s": m["quantize_s"], "trial_s": time.perf_counter() - started}
            if method != "rtn":
                vs_rtn = against(w, by_method["rtn"]["nll"])
                cell.update({f"vs_rtn_{k}": v for k, v in vs_rtn.items()})
            cells.append(cell)
            print(json.dumps(cell), file=sys.stderr)
    reference_ppl = math.exp(statistics.fmean(by_method["rtn"]["reference_nll"]))
    for c in cells:  # RTN calibrates nothing: its output error is the one GPTQ's trial measured for it
        if c["method"] == "rtn":
            gptq = next(g for g in cells if g["format"] == c["format"] and g["method"] == "gptq")
            c["layer_output_error_mean"] = gptq["layer_output_error_rtn_mean"]

    print(f"\nunquantized tiny model (fp32): perplexity {reference_ppl:.2f}\n")
    print("| format | method | ppl ± se | Δppl vs fp32 ± se | Δppl vs RTN ± se | KL ± se | top-1 "
          "| layer out. err. | method s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in cells:
        vs_rtn = (f"{c['vs_rtn_perplexity_delta']:+.3f} ± {c['vs_rtn_perplexity_delta_stderr']:.3f}"
                  + (" (noise)" if c["vs_rtn_within_noise"] else "")) if "vs_rtn_perplexity_delta" in c else ""
        error = c["layer_output_error_mean"]
        print(f"| {c['format']} | {c['method']} | {c['perplexity']:.2f} ± {c['perplexity_stderr']:.2f} "
              f"| {c['perplexity_delta']:+.3f} ± {c['perplexity_delta_stderr']:.3f} | {vs_rtn} "
              f"| {c['kl_divergence']:.2e} ± {c['kl_divergence_stderr']:.0e} | {c['top1_agreement']:.2%} "
              f"| {error:.2e} | {c['quantize_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"date": date.today().isoformat(), "machine": platform.platform(),
                                         "cpus": os.cpu_count(), "reference_perplexity": reference_ppl,
                                         "extra": args.extra, "cells": cells}, indent=1))


if __name__ == "__main__":
    main()
