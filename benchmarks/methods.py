"""Quantization methods on the tiny model: RTN and GPTQ, alone and after Hadamard rotations (QuaRot,
full or block-diagonal), AWQ, SmoothQuant and activation-aware clipping, at int4 g128, MXFP4 and
NVFP4, weight-only (W4A16) and with per-token 4-bit inputs (W4A4, ``quant=w_a_dynamic``), on
``model=tiny-llama`` and ``model=tiny-llama-outliers`` (the same function with outlier channels
planted by rescales).

Each cell is a real trial (``jobs.trial.run``, in this process, on the CPU): the fp32 tiny model
transformed and quantized by the method, then scored on the held-out text against the unquantized
model. Reported per cell: perplexity and its increase over the unquantized model (paired over eval
windows, with its standard error), KL and top-1 against it, the mean per-layer output error of the
weights on the calibration inputs (where the trial calibrated; an RTN cell takes the counterfactual
its GPTQ cell measured under the same rotation), the method's time and the cell's. Per (model,
format, scheme): each method's perplexity against plain RTN's, paired window by window, and the
methods ordered by their perplexity increase, then by KL. The JSON keeps each cell's per-window NLLs
(``window_nll``; the unquantized model's are ``reference_window_nll``), so any two cells can be paired.

The grid, per model and format (20 cells; 120 in all):

- W4A16: {rtn, gptq} x {no rotation, Hadamard full, Hadamard block 16, block 32}; AWQ with rtn and
  with gptq; clipping with rtn;
- W4A4: {rtn, gptq} x the same rotations; SmoothQuant (alpha 0.5) with rtn.

``W4A4KV4`` (``quant=w_a_kv``: the KV cache too) can be added with ``--schemes``; it is not in the
default grid.

Sizes. The default run calibrates on 64 windows of 256 tokens (16k tokens, a quarter of
``conf/calib``'s 128 x 512) and evaluates on ``conf/eval``'s 16,384 held-out tokens (64 windows of
256), with the timing benchmark cut to one step (its numbers are not reported), in one torch thread
(``--threads``): on a two-core machine shared with other processes, torch's two threads oversubscribe
the cores and a GPTQ cell took four times as long (76 s against 18 s). So the 120 cells take about
20 minutes on two cores (20.4 min on 2026-11-30, docs/benchmarks.md). At the configs' calibration
size (``--extra calib.num_sequences=128 calib.seq_len=512``) single GPTQ, AWQ and SmoothQuant cells
took three to five times longer: over an hour in all, by estimate. ``--quick`` takes 32 windows of
256 and 4,096 eval tokens. Calibrated quantized models are cached per node (``$QUANTSWEEP_CACHE``): a
second run reuses them and reports the stored method time.

The published shapes to compare with:

- SpinQuant (Liu et al. 2024), Llama-3-8B WikiText-2 perplexity (fp16 6.1): W4A16 RTN 7.8, GPTQ 7.2,
  QuaRot (Hadamard + GPTQ) 6.4; W4A4 KV4 RTN and GPTQ ~1e3 (collapse), QuaRot 8.0. Weight-only:
  RTN > GPTQ > rotation + GPTQ; with 4-bit activations rotation is what keeps the model working, and
  GPTQ without it does not.
- FP-Quant / MR-GPTQ (Egiazarian et al. 2025, "Bridging the Gap Between Promise and Performance for
  Microscaling FP4 Quantization"): MXFP4's power-of-two scales cost it much more than NVFP4, and
  Hadamard rotation + GPTQ (block-wise, MR-GPTQ) is best for it, bringing it near NVFP4; NVFP4's
  16-element groups already isolate outliers ("provably neutralizes traditional outlier mitigation"),
  so for NVFP4 weight-only a Hadamard rotation alone does not help RTN; GPTQ does.
- AWQ (Lin et al. 2024): below RTN at W4A16 g128. SmoothQuant (Xiao et al. 2023): made W8A8 work; at
  W4A4 far behind rotations (SpinQuant's abstract: 25 points of zero-shot accuracy behind it on
  LLaMA-2 7B W4A4KV4).

    python benchmarks/methods.py --json methods.json
    python benchmarks/methods.py --quick --models tiny-llama-outliers --formats mxfp4 --schemes W4A4
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

MODELS = {"tiny-llama": ("model=tiny-llama",), "tiny-llama-outliers": ("model=tiny-llama-outliers",)}
FORMATS = {"int4": ("dtype=int4",), "mxfp4": ("dtype=mxfp4",), "nvfp4": ("dtype=nvfp4",)}
SCHEMES = {"W4A16": ("quant=weight_only",), "W4A4": ("quant=w_a_dynamic",), "W4A4KV4": ("quant=w_a_kv",)}
DEFAULT_SCHEMES = ("W4A16", "W4A4")
ROTATIONS = {"": (), "+had": ("method.rotation=hadamard", "method.rotation_size=0"),
             "+had16": ("method.rotation=hadamard", "method.rotation_size=16"),
             "+had32": ("method.rotation=hadamard", "method.rotation_size=32")}
ROUNDED = {f"{r}{label}": (f"method={r}", *rot) for r in ("rtn", "gptq") for label, rot in ROTATIONS.items()}
WEIGHT_ONLY_EXTRA = {"awq": ("method=rtn", "method.scaling=awq"), "awq+gptq": ("method=gptq", "method.scaling=awq"),
                     "clip": ("method=rtn", "method.clip=true")}
ACTIVATION_EXTRA = {"smoothquant": ("method=rtn", "method.scaling=smoothquant", "method.smoothquant.alpha=0.5")}
METHODS = {"W4A16": {**ROUNDED, **WEIGHT_ONLY_EXTRA}, "W4A4": {**ROUNDED, **ACTIVATION_EXTRA},
           "W4A4KV4": {**ROUNDED, **ACTIVATION_EXTRA}}
ALL_METHODS = list(dict.fromkeys(m for ms in METHODS.values() for m in ms))
# The timing benchmark is not reported here: one short step.
BENCH = ("bench.warmup=0", "bench.repeats=1", "bench.decode_tokens=1", "bench.prompt_len=16")
SIZES = {"default": ("calib.num_sequences=64", "calib.seq_len=256"),
         "quick": ("calib.num_sequences=32", "calib.seq_len=256", "eval.max_tokens=4096")}


def run(overrides: tuple[str, ...]) -> dict:
    """One trial in this process: its metrics and eval windows, or its status and reason."""
    from jobs import trial
    from orchestrator.compose import compose
    from orchestrator.errors import ConfigError
    from orchestrator.pairing import parse_windows
    from orchestrator.plan import trial_spec

    try:
        spec = trial_spec(compose(*overrides), list(overrides))
    except ConfigError as e:
        return {"status": "REFUSED", "reason": str(e)}
    result = trial.run(spec)
    if result.status.value != "FINISHED":
        return {"status": result.status.value, "reason": result.reason}
    return {"status": "FINISHED", "metrics": result.metrics,
            "windows": parse_windows(result.artifacts["eval_windows.csv"])}


def against(windows: dict, base_nll: list[float]) -> dict:
    """Perplexity delta and its paired standard error against per-window NLLs ``base_nll``."""
    from orchestrator.pairing import paired_deltas

    out = paired_deltas(windows, {"nll": base_nll})
    ppl, base = (math.exp(statistics.fmean(v)) for v in (windows["nll"], base_nll))
    return {"perplexity_delta": ppl - base, "perplexity_delta_stderr": out["perplexity_delta_stderr"],
            "within_noise": bool(out["perplexity_delta_within_noise"])}


def num(x: float, digits: int = 3) -> str:
    """A delta with ``digits`` decimals below 10, fewer above (W4A4 RTN on outliers runs to hundreds)."""
    if x is None or math.isnan(x):
        return "nan"
    return f"{x:+.{digits}f}" if abs(x) < 10 else f"{x:+.1f}" if abs(x) < 1000 else f"{x:+.3g}"


def delta(c: dict, prefix: str = "") -> str:
    d, se = c[f"{prefix}perplexity_delta"], c[f"{prefix}perplexity_delta_stderr"]
    return f"{num(d)} ± {num(se).lstrip('+')}"


def ordering(group: list[dict], key: str) -> str:
    done = sorted((c for c in group if c["status"] == "FINISHED"), key=lambda c: c[key])
    return " < ".join(f"{c['method']} ({num(c[key]) if key == 'perplexity_delta' else format(c[key], '.2e')})"
                      for c in done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--schemes", nargs="+", default=list(DEFAULT_SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS,
                        help="a subset of the methods (rtn is always run: the others are paired against it)")
    parser.add_argument("--quick", action="store_true", help="32 x 256 calibration tokens, 4,096 eval tokens")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every cell, after the sizes "
                        "(e.g. calib.num_sequences=128 calib.seq_len=512 eval.max_tokens=16384: the configs' own)")
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads (default 1: see the docstring)")
    args = parser.parse_args()
    import torch

    from jobs.peaks import cpu_name

    torch.set_num_threads(args.threads)
    common = (*BENCH, *SIZES["quick" if args.quick else "default"], *args.extra)
    wanted = {"rtn", *args.methods}

    started_all = time.perf_counter()
    cells, references, reference_nll = [], {}, {}
    for model in args.models:
        for fmt in args.formats:
            for scheme in args.schemes:
                rtn_nll = None
                for method, overrides in METHODS[scheme].items():
                    if method not in wanted:
                        continue
                    started = time.perf_counter()
                    out = run((*MODELS[model], *FORMATS[fmt], *SCHEMES[scheme], *overrides, *common))
                    cell = {"model": model, "format": fmt, "scheme": scheme, "method": method,
                            "overrides": list(overrides), "status": out["status"],
                            "trial_s": time.perf_counter() - started}
                    if out["status"] != "FINISHED":
                        cell["reason"] = out["reason"]
                    else:
                        m, w = out["metrics"], out["windows"]
                        references.setdefault(model, math.exp(statistics.fmean(w["reference_nll"])))
                        reference_nll.setdefault(model, w["reference_nll"])
                        cell.update({"perplexity": m["perplexity"], "perplexity_stderr": m["perplexity_stderr"],
                                     **against(w, w["reference_nll"]),
                                     "kl_divergence": m["kl_divergence"],
                                     "kl_divergence_stderr": m["kl_divergence_stderr"],
                                     "top1_agreement": m["top1_agreement"],
                                     "layer_output_error_mean": m.get("layer_output_error_mean"),
                                     "layer_output_error_rtn_mean": m.get("layer_output_error_rtn_mean"),
                                     "quantize_s": m.get("quantize_s"),
                                     "quantized_model_reused": bool(m.get("quantized_model_reused", 0.0))})
                        if method == "rtn":
                            rtn_nll = w["nll"]
                        elif rtn_nll is not None:
                            cell.update({f"vs_rtn_{k}": v for k, v in against(w, rtn_nll).items()})
                    print(json.dumps(cell), file=sys.stderr, flush=True)
                    if out["status"] == "FINISHED":  # kept for the JSON, so any two cells can be paired later
                        cell["window_nll"] = w["nll"]
                    cells.append(cell)
    wall_s = time.perf_counter() - started_all

    def same(c: dict, method: str) -> dict | None:
        return next((g for g in cells if g["method"] == method and g["status"] == "FINISHED"
                     and all(g[k] == c[k] for k in ("model", "format", "scheme"))), None)

    for c in cells:  # RTN calibrates nothing: its output error is the one its GPTQ cell measured for it
        if c["status"] == "FINISHED" and c["method"].startswith("rtn") and c["layer_output_error_mean"] is None:
            gptq = same(c, c["method"].replace("rtn", "gptq", 1))
            c["layer_output_error_mean"] = gptq["layer_output_error_rtn_mean"] if gptq else None

    print("\n" + ", ".join(f"unquantized {m} (fp32): perplexity {p:.2f}" for m, p in references.items()))
    print(f"{len(cells)} cells in {wall_s / 60:.1f} min on {cpu_name()} ({os.cpu_count()} CPUs, "
          f"{args.threads} torch thread(s)), {platform.platform()}; every cell: {' '.join(common)}\n")
    print("| model | format | scheme | method | Δppl vs fp32 ± se | Δppl vs RTN ± se | KL ± se | top-1 "
          "| layer out. err. | method s | cell s |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in cells:
        head = f"| {c['model']} | {c['format']} | {c['scheme']} | {c['method']} "
        if c["status"] != "FINISHED":
            print(f"{head}| {c['status']}: {c['reason']} | | | | | | {c['trial_s']:.0f} |")
            continue
        vs_rtn = (delta(c, "vs_rtn_") + (" (noise)" if c["vs_rtn_within_noise"] else "")
                  if "vs_rtn_perplexity_delta" in c else "")
        error = c["layer_output_error_mean"]
        print(f"{head}| {delta(c)}{' (noise)' if c['within_noise'] else ''} | {vs_rtn} "
              f"| {c['kl_divergence']:.2e} ± {c['kl_divergence_stderr']:.0e} | {c['top1_agreement']:.2%} "
              f"| {'' if error is None else format(error, '.2e')} | {c['quantize_s'] or 0:.1f} "
              f"| {c['trial_s']:.0f} |")

    # Compact: one table per model, methods down, (scheme, format) across, "Δppl ± se / KL" per cell.
    columns = [(s, f) for s in args.schemes for f in args.formats]
    for model in args.models:
        print(f"\n{model}: Δppl vs fp32 ± se / KL\n")
        print("| method | " + " | ".join(f"{f} {s}" for s, f in columns) + " |")
        print("|---|" + "---:|" * len(columns))
        for method in [m for m in ALL_METHODS if m in wanted]:
            row = []
            for scheme, fmt in columns:
                c = next((c for c in cells if (c["model"], c["format"], c["scheme"], c["method"])
                          == (model, fmt, scheme, method)), None)
                row.append("" if c is None else c["status"] if c["status"] != "FINISHED"
                           else f"{delta(c)} / {c['kl_divergence']:.1e}")
            if any(row):
                print(f"| {method} | " + " | ".join(row) + " |")

    print("\nOrderings (best first):")
    for model in args.models:
        for fmt in args.formats:
            for scheme in args.schemes:
                group = [c for c in cells if (c["model"], c["format"], c["scheme"]) == (model, fmt, scheme)]
                if group:
                    print(f"- {model} {fmt} {scheme}\n    by Δppl: {ordering(group, 'perplexity_delta')}"
                          f"\n    by KL:   {ordering(group, 'kl_divergence')}")
    failed = [c for c in cells if c["status"] != "FINISHED"]
    for c in failed:
        print(f"{c['status']}: {c['model']} {c['format']} {c['scheme']} {c['method']}: {c['reason']}")

    if args.json:
        args.json.write_text(json.dumps({"date": date.today().isoformat(), "machine": platform.platform(),
                                         "cpu": cpu_name(),
                                         "cpus": os.cpu_count(), "threads": args.threads, "wall_s": wall_s,
                                         "common_overrides": list(common),
                                         "reference_perplexity": references, "reference_window_nll": reference_nll,
                                         "cells": cells}, indent=1))


if __name__ == "__main__":
    main()
