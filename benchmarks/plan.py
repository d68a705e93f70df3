"""Planning a large sweep: compose, validate and key every cell and write its plan.json, nothing run.

Each size runs the real command in a fresh process,

    orchestrator run -m <grid> "seed=range(0,S)" hydra.launcher.plan_only=true hydra.launcher.plan_file=plan.json

and reports its wall time (process start to exit, imports included) and peak RSS. Two grids:
- ``seeds``: ``backend=noop`` and a seed range, the issue's own measurement (one group combination);
- ``grid``: a format x knob x method x scheme x batch grid (72 cells) times a seed range, on the tiny
  model with its real backend, so that 8 group combinations are composed and every cell's device time
  is predicted.

Targets: 10,000 cells under 10 s and 1 GB; 100,000 without running out of memory.

    python benchmarks/plan.py --json plan.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRIDS = {
    "seeds": (["backend=noop"], 1),
    "grid": (["dtype=int4,int8", "dtype.group_size=32,64,128", "method=rtn,gptq", "quant=weight_only,w_a_dynamic",
              "bench.batch_size=1,2,4"], 72),
}


def child(argv: list[str]) -> None:
    """Run the command in this process; print its peak RSS (MiB) as the last line."""
    from orchestrator.cli import main

    sys.argv = ["orchestrator", *argv]
    with open(os.devnull, "w") as sink:
        stdout, sys.stdout = sys.stdout, sink
        try:
            code = main(argv)
        finally:
            sys.stdout = stdout
    print(peak_rss_mib())
    sys.exit(code)


def peak_rss_mib() -> float:
    """This process's peak resident memory: Linux's VmHWM (ru_maxrss would keep the high-water mark of the
    process that forked it, across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(grid: str, cells: int, workdir: Path) -> dict:
    overrides, per_seed = GRIDS[grid]
    seeds = -(-cells // per_seed)
    plan_file = workdir / f"plan-{grid}-{cells}.json"
    argv = ["run", "-m", *overrides, f"seed=range(0,{seeds})", "hydra.launcher.plan_only=true",
            f"hydra.launcher.plan_file={plan_file}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, env=env,
                          cwd=workdir)
    elapsed = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    planned = plan_file.read_text().count('"trial_key": ')  # not parsed: this process forks the next run
    return {"grid": grid, "cells": seeds * per_seed, "planned": planned, "wall_s": round(elapsed, 2),
            "peak_rss_mib": round(float(proc.stdout.split()[-1])), "plan_json_mib": round(plan_file.stat().st_size
                                                                                          / 2 ** 20, 1)}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        sys.path.insert(0, str(ROOT))
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    ap.add_argument("--json", type=Path, default=Path("plan.json"))
    args = ap.parse_args()
    rows = []
    print("| grid | cells | wall s | peak RSS MiB | plan.json MiB |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for grid in args.grids:
            for cells in args.cells:
                row = measure(grid, cells, Path(tmp))
                assert row["planned"] == row["cells"], row
                rows.append(row)
                print(f"| {grid} | {row['cells']} | {row['wall_s']:.2f} | {row['peak_rss_mib']} | "
                      f"{row['plan_json_mib']} |", flush=True)
    args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
