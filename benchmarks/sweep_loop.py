"""The sweep loop at scale: N no-op trials on an embedded local Ray, recorded in a fresh sqlite store.

Runs the real command,

    orchestrator run -m backend=noop "seed=range(0,N)" cluster.fresh_worker_per_trial=false

samples the driver's resident memory every half second from outside (psutil), and reads back what
its heartbeats recorded on the sweep's run every 30 s: the MLflow writes waiting
(``driver_pending_writes``), the trials handed to Ray, and the longest the progress bar went without
an update (``driver_progress_gap_s``). Bounded means: the backlog stays near its cap
(orchestrator.scheduler.MAX_PENDING_WRITES, plus the trials in flight) and the memory stops growing
once the plan is made, whatever N.

    python benchmarks/sweep_loop.py --trials 10000 --json sweep_loop.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(trials: int, workdir: Path) -> dict:
    import psutil

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "orchestrator", "run", "-m", "backend=noop", f"seed=range(0,{trials})",
               "cluster.fresh_worker_per_trial=false", "sweep.name=sweep-loop"]
    started = time.perf_counter()
    driver = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = []  # (seconds since start, driver RSS MiB)
    process = psutil.Process(driver.pid)
    while driver.poll() is None:
        try:
            samples.append((time.perf_counter() - started, process.memory_info().rss / 2 ** 20))
        except psutil.Error:
            break
        time.sleep(0.5)
    out, err = driver.communicate()
    elapsed = time.perf_counter() - started
    if driver.returncode:
        raise SystemExit(f"exit {driver.returncode}\n{err[-3000:]}")
    return {"trials": trials, "wall_s": elapsed, "rss": samples, "summary": out.strip().splitlines()[-1],
            **heartbeats(f"sqlite:///{workdir / 'mlflow.db'}")}


def heartbeats(uri: str) -> dict:
    from orchestrator import store

    client = store.client(uri)
    experiment = client.get_experiment_by_name("sweep-loop")
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'sweep'")[0]
    history = {name: [m.value for m in client.get_metric_history(parent.info.run_id, name)]
               for name in ("driver_pending_writes", "driver_rss_mib", "driver_trials_in_flight",
                            "driver_progress_gap_s")}
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'trial'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return {"heartbeats": history, "parent_metrics": parent.data.metrics, "a_trial_recorded": bool(runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, nargs="+", default=[10_000])
    ap.add_argument("--json", type=Path, default=Path("sweep_loop.json"))
    args = ap.parse_args()
    rows = []
    print("| trials | wall s | trials/s | driver RSS MiB: after 10% of the time / 50% / peak | MLflow writes waiting: "
          "max (heartbeats) | trials in flight: max | progress bar's longest gap s |")
    print("|---|---|---|---|---|---|---|")
    for trials in args.trials:
        with tempfile.TemporaryDirectory() as tmp:
            row = run(trials, Path(tmp))
        rss = [mib for _, mib in row["rss"]]
        beats = row["heartbeats"]
        at = {f: rss[min(len(rss) - 1, int(len(rss) * f))] for f in (0.1, 0.5)}
        print(f"| {trials} | {row['wall_s']:.0f} | {trials / row['wall_s']:.1f} | {at[0.1]:.0f} / {at[0.5]:.0f} / "
              f"{max(rss):.0f} | {max(beats['driver_pending_writes'], default=0):.0f} | "
              f"{max(beats['driver_trials_in_flight'], default=0):.0f} | "
              f"{max(beats['driver_progress_gap_s'], default=0):.2f} |", flush=True)
        rows.append(row)
    args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
