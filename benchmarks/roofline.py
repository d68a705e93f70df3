"""Predicted against measured prefill and decode times: the cost model (jobs/perf_model.py) at this node's
measured peaks (jobs/peaks.py) against the bench's timings (jobs/bench.py), on the tiny model and on a
Llama-3-8B-shaped model built from its config with random weights (no download; ``--layers`` keeps fewer
of its 32 decoder blocks where memory or time is short: the default, 1, with its 128k vocabulary, is about
a billion parameters and takes a few minutes on two CPU cores), at bf16 and at int8 and int4 weights (RTN,
the torch reference kernel unless ``--kernel``).

The roofline is a floor no kernel goes under: the fractions say how much of it each phase reaches.
On a GPU the 8B shape's decode is memory-bound and a good kernel reaches most of the bandwidth; on a
CPU eager PyTorch's per-op overheads dominate small models.

    python benchmarks/roofline.py --json roofline.json      # the tiny model and the 8B shape's first block
    python benchmarks/roofline.py --layers 32 --device cuda --kernel triton --prompt 128 --decode 32  # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA_8B = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "model_type": "llama"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=1, help="decoder blocks of the 8B shape (32: all)")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "int8", "int4"])
    parser.add_argument("--kernel", default="torch")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--decode", type=int, default=8)
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jobs import bench, models, perf_model
    from jobs.config import TrialConfig
    from jobs.peaks import node_peaks
    from jobs.quantize import apply_dtype
    from orchestrator.compose import compose
    from orchestrator.plan import trial_config

    device = torch.device(args.device)
    node, record = node_peaks(device)
    print(f"peaks on {record['device_name']} ({record['threads']} threads): {node.bandwidth / 1e9:.1f} GB/s, "
          + ", ".join(f"{p} {f / 1e12:.3g} TFLOP/s" for p, f in node.flops.items()))
    rows = []
    for model_name in ("tiny-llama", f"llama-3-8b-shape-{args.layers}-layers"):
        for dtype in args.dtypes:
            overrides = [f"dtype={dtype}", "dtype.compute_dtype=bfloat16", "model.dtype=bfloat16",
                         f"kernel={args.kernel}", f"bench.batch_size={args.batch}", f"bench.prompt_len={args.prompt}",
                         f"bench.decode_tokens={args.decode}", "bench.warmup=1", "bench.repeats=2"]
            cfg = TrialConfig.from_dict(trial_config(compose(*overrides)))
            torch.manual_seed(0)
            if model_name == "tiny-llama":
                model = models.load_model(cfg.model, device)[0]
            else:
                config = LlamaConfig(**{**LLAMA_8B, "num_hidden_layers": args.layers})
                with torch.device(device):
                    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
            apply_dtype(model, cfg, torch.bfloat16)
            timing, _ = bench.benchmark(model, cfg.bench, device, cfg.seed)
            shape = perf_model.ModelShape.from_config(model.config.to_dict())
            for phase, cost in zip(("prefill", "decode"), perf_model.trial_costs(cfg, shape)):
                predicted = perf_model.roofline(cost, node, "bf16")
                measured = timing[f"{phase}_latency_p50_ms"] / 1e3
                rows.append({"model": model_name, "dtype": dtype, "phase": phase, "bytes": cost.bytes,
                             "flops": sum(cost.flops.values()), "predicted_ms": predicted.seconds * 1e3,
                             "measured_ms": measured * 1e3, "roofline_fraction": predicted.seconds / measured,
                             "bandwidth_fraction": predicted.memory_s / measured,
                             "flops_fraction": predicted.compute_s / measured, "bound": predicted.bound})
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print(f"\n{'model':<28} {'dtype':<5} {'phase':<7} {'MB':>9} {'GFLOP':>9} {'predicted ms':>12} "
          f"{'measured ms':>11} {'fraction':>8}  bound")
    for r in rows:
        print(f"{r['model']:<28} {r['dtype']:<5} {r['phase']:<7} {r['bytes'] / 1e6:>9.1f} {r['flops'] / 1e9:>9.2f} "
              f"{r['predicted_ms']:>12.3f} {r['measured_ms']:>11.3f} {r['roofline_fraction']:>8.3f}  {r['bound']}")
    if args.json:
        args.json.write_text(json.dumps({"date": date.today().isoformat(), "machine": platform.node(),
                                         "cpus": os.cpu_count(), "time": time.time(), "peaks": record,
                                         "kernel": args.kernel, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
