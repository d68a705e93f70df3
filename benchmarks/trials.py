"""Run sweep cells in this process, without Ray or MLflow: a table and JSON of their metrics.

For a quick look on one machine (a GPU box without the cluster stack, say) at what a
sweep would record. The grid is Hydra's: the same overrides `orchestrator run -m` takes.

    python benchmarks/trials.py dtype=bf16,int8,int4 device=cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402

from jobs import trial  # noqa: E402
from orchestrator import plan  # noqa: E402
from orchestrator.compose import compose  # noqa: E402

COLUMNS = ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_latency_p50_ms", "output_tokens_per_s",
           "peak_memory_mb", "weight_bytes", "perplexity", "kl_divergence", "top1_agreement")


def expand(overrides: list[str]) -> list[list[str]]:
    """The grid's cells, multiplied out by Hydra's basic sweeper."""
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--json", type=Path, default=Path("trials.json"))
    args = ap.parse_args()
    rows = []
    for cell in expand(args.overrides):
        spec = plan.trial_spec(compose(*cell), cell)
        result = trial.run(spec)
        rows.append({"cell": " ".join(cell), "status": result.status.value, "reason": result.reason,
                     "env": result.env, "metrics": result.metrics})
        print(f"{rows[-1]['cell']}: {result.status.value} {result.reason or ''}", file=sys.stderr)
    args.json.write_text(json.dumps(rows, indent=2))
    print("| cell | status | " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * (len(COLUMNS) + 2))
    for r in rows:
        values = [f"{r['metrics'][c]:.4g}" if c in r["metrics"] else "-" for c in COLUMNS]
        print(f"| {r['cell']} | {r['status']} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    main()
