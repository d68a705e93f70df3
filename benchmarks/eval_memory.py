"""A trial's peak memory against eval.max_tokens, on a large-vocabulary model built from a config.

A 2-layer Llama with a 128,256-token vocabulary (Llama 3's), random weights and the tiny model's
tokenizer, saved as a local checkpoint; one int8 trial per eval.max_tokens, each in a fresh
interpreter (its peak resident set is the trial's alone), reading the code from ``--repo``
(default: this checkout), so an older commit can be measured the same way:

    git worktree add /tmp/before <commit> && python benchmarks/eval_memory.py --repo /tmp/before

Evaluation's own memory is the peak at max_tokens=N less the peak at one window.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128_256

TRIAL = """
import json, resource, sys
from jobs import trial
from orchestrator.compose import compose
from orchestrator.plan import trial_spec
overrides = sys.argv[1:]
result = trial.run(trial_spec(compose(*overrides), overrides))
print(json.dumps({"status": result.status.value, "reason": result.reason,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "eval_tokens": result.metrics.get("eval_tokens"), "kl": result.metrics.get("kl_divergence")}))
"""


def build_model(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from jobs import data
    from jobs.models import train_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(folder)
    train_tokenizer(data.load_text("stdlib-docs", "train"), 2048).save_pretrained(folder)


def run_trial(repo: Path, model: Path, cache: Path, max_tokens: int, batch_size: int) -> dict:
    overrides = ["model.source=path", f"model.path={model}", "model.name=llama-128k-vocab", "model.dtype=float32",
                 "dtype=int8", "device=cpu", "debug=fast", "bench.prompt_len=16", "bench.decode_tokens=2",
                 f"eval.max_tokens={max_tokens}", "eval.seq_len=256", f"eval.batch_size={batch_size}"]
    env = {**os.environ, "PYTHONPATH": str(repo), "QUANTSWEEP_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", TRIAL, *overrides], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose code runs the trials")
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[256, 2048, 8192])
    ap.add_argument("--batch-size", type=int, default=1, help="eval.batch_size")
    ap.add_argument("--json", type=Path, default=Path("eval_memory.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build_model(model)
        for max_tokens in args.max_tokens:
            out = run_trial(args.repo.resolve(), model, Path(tmp) / f"cache-{max_tokens}", max_tokens, args.batch_size)
            if out["status"] != "FINISHED":
                raise RuntimeError(f"max_tokens={max_tokens}: {out['status']} {out['reason']}")
            rows.append({"max_tokens": max_tokens, **out})
            print(f"max_tokens={max_tokens}: {out}", file=sys.stderr)
    base = rows[0]["peak_rss_mb"]
    for row in rows:
        row["eval_extra_mb"] = row["peak_rss_mb"] - base
        # What the whole-array design held: the reference's and the quantized model's log-probs.
        row["two_full_logprob_arrays_mb"] = 2 * row["eval_tokens"] * VOCAB * 4 / 2**20
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.repo, capture_output=True,
                            text=True).stdout.strip()
    args.json.write_text(json.dumps({"date": date.today().isoformat(), "machine": platform.processor() or
                                     platform.machine(), "cpus": os.cpu_count(), "commit": commit,
                                     "vocab": VOCAB, "eval_batch_size": args.batch_size, "rows": rows}, indent=2))
    print(f"commit {commit}, vocab {VOCAB}, eval.batch_size {args.batch_size}")
    print("| eval.max_tokens | eval tokens | peak RSS (MB) | over one window (MB) | 2 x tokens x vocab x 4 B (MB) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['max_tokens']} | {r['eval_tokens']:.0f} | {r['peak_rss_mb']:.0f} | {r['eval_extra_mb']:.0f} | "
              f"{r['two_full_logprob_arrays_mb']:.0f} |")


if __name__ == "__main__":
    main()
