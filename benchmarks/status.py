"""`orchestrator status --json` on a large synthetic sweep: wall time and peak memory.

Builds a sweep of N trial runs (default 10,000) in a fresh sqlite store, laid out as the
orchestrator lays them out (parent run; child runs with sweep_id / kind / trial_key /
status / attempt / overrides tags, a real trial's ~65 params and a few metrics; every
50th key with two attempts), writes its live index as a running sweep's driver does, and times
the real command in a subprocess: on the running sweep (its live index), with --refresh (every
run read), and once the sweep is ended as a driver ends it (its final index). Target: under
10 s for 10,000 trials, running or finished.

    python benchmarks/status.py --trials 10000 --json status.json
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
sys.path.insert(0, str(ROOT))

STATUSES = ("FINISHED",) * 7 + ("FAILED", "TIMEOUT", "UNSUPPORTED")


def trial_params() -> dict[str, str]:
    """A real trial's params: the flattened resolved config of the default cell (~65)."""
    from orchestrator import plan, tracking
    from orchestrator.compose import compose

    return tracking.flatten(plan.trial_spec(compose(), []).config)


def build(uri: str, n: int) -> str:
    from mlflow.entities import Metric, Param, RunTag

    from orchestrator import store, tracking

    params = [Param(k, v) for k, v in trial_params().items()]
    rows = []

    client = store.client(uri)
    experiment = client.create_experiment("status-bench")
    sweep_id = "swp-5ca1ab"
    parent = client.create_run(experiment, run_name=sweep_id, tags={"sweep_id": sweep_id, "kind": "sweep"})
    for i in range(n):
        key = f"{i:016x}"
        attempts = 2 if i % 50 == 0 else 1  # a resubmitted trial now and then
        for attempt in range(1, attempts + 1):
            status = STATUSES[i % len(STATUSES)] if attempt == attempts else "FAILED"
            run = client.create_run(experiment, run_name=f"seed={i}", tags={
                "sweep_id": sweep_id, "kind": "trial", "trial_key": key, "attempt": str(attempt),
                "status": status, "overrides": f"model=tiny-llama dtype=int4 seed={i}",
                "mlflow.parentRunId": parent.info.run_id})
            client.log_batch(run.info.run_id, params=params, tags=[RunTag("ray_executions", "1")],
                             metrics=[Metric("decode_tokens_per_s", 100.0 + i, 0, 0), Metric("perplexity", 20.0, 0, 0)])
            client.set_terminated(run.info.run_id, "FINISHED" if status == "FINISHED" else "FAILED")
        rows.append({"trial_key": key, "overrides": f"model=tiny-llama dtype=int4 seed={i}", "status": status,
                     "attempts": attempts, "latest_attempt": attempts, "reason": "", "run_id": run.info.run_id,
                     "executions": 1})
    # The sweep's live index, as its driver keeps it while the sweep runs (the parent run stays RUNNING).
    tracker = tracking.SweepTracker(uri, "status-bench", sweep_id, {}, parent_id=parent.info.run_id, prior_rows=rows)
    tracker.update_index()
    tracker.writer.flush(600)
    return sweep_id, tracker


def finish(tracker) -> None:
    """End the sweep as a driver does: its final index, counts, and the parent run's end."""
    tracker.finish_sweep()
    tracker.writer.flush(600)


def time_status(uri: str, sweep_id: str, *flags: str) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "status", sweep_id, "--json", *flags,
                           f"tracking.uri={uri}"], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return elapsed, json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--json", type=Path, default=Path("status.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        started = time.perf_counter()
        sweep_id, tracker = build(uri, args.trials)
        build_s = time.perf_counter() - started
        live_s, live = time_status(uri, sweep_id)
        refresh_s, fresh = time_status(uri, sweep_id, "--refresh")
        finish(tracker)
        status_s, state = time_status(uri, sweep_id)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert live["live"] is not None and live["sweep_status"] == "RUNNING" and state["live"] is None
    for read in (live, state):
        assert len(read["trials"]) == args.trials and read["counts"] == fresh["counts"], (read["counts"], fresh["counts"])
    row = {"trials": args.trials, "runs": args.trials + args.trials // 50, "status_running_s": live_s,
           "status_s": status_s, "status_refresh_s": refresh_s, "peak_rss_mb": peak_mb, "counts": state["counts"],
           "build_s": build_s}
    print("| trials | runs | status --json s, running sweep (its live index) | finished sweep (its index) "
          "| status --json --refresh s (every run) | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    print(f"| {row['trials']} | {row['runs']} | {live_s:.2f} | {status_s:.2f} | {refresh_s:.2f} | {peak_mb:.0f} |")
    args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
