"""The orchestrator's own cost per trial, against a floor measured in the same run.

- floor: N plain Ray tasks that do nothing; the driver logs each result with
  ``MlflowClient`` (create_run, one log_batch, set_terminated) into a fresh sqlite store:
  once with one param and one metric (the issue's floor), once with the same params and
  tags a trial's run holds (so that what is left is the orchestrator's own cost, not the
  cost of recording a bigger record), and that again into a store with quantsweep's sqlite
  settings (WAL, no fsync per commit), so that the store's settings are not counted as the
  orchestrator's gain.
- quantsweep: ``orchestrator run -m backend=noop seed=range(N)`` in this process, the whole
  path: Hydra composes and validates every cell, one Ray task per trial, a parent and N
  child runs (params, tags, metrics, config.yaml and trial.log artifacts) in a fresh
  sqlite store. Workers are reused (``cluster.fresh_worker_per_trial=false``); the run
  with a fresh worker per trial (the default, for real trials' memory) is reported too.

Ray is started once, and the libraries both use are imported, before either is timed, so
neither pays for those. Each path runs ``--rounds`` times, the paths taking turns, and the
median is reported. Target: quantsweep at most 1.5x the floor per trial.

    python benchmarks/overhead.py --trials 200 --json overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLOOR = "floor: Ray tasks + MlflowClient (1 param, 1 metric)"
RECORD_FLOOR = "floor, logging a trial's whole record (~50 params, 13 tags)"
TUNED_FLOOR = "the same, into a store with quantsweep's sqlite settings (WAL, synchronous=NORMAL)"


def warm_up_imports(workdir: Path) -> None:
    """Import what both paths use (MLflow's sqlite store, Hydra, the orchestrator) before
    timing, so that neither is charged the one-off import cost. Each path still creates its
    own fresh store (schema migrations, about 1 s) inside its timing."""
    from mlflow.tracking import MlflowClient

    import orchestrator.cli  # noqa: F401
    import orchestrator.sweep  # noqa: F401

    MlflowClient(f"sqlite:///{workdir / 'warm-up.db'}").create_experiment("warm-up")


def trial_record() -> tuple[dict[str, str], dict[str, str]]:
    """The params (the flattened resolved config) and tags one no-op trial's run holds."""
    from orchestrator import plan, tracking
    from orchestrator.compose import compose

    spec = plan.trial_spec(compose("backend=noop"), ["backend=noop"])
    tags = {"sweep_id": "swp-000000", "kind": "trial", "trial_key": spec.trial_key, "attempt": "1",
            "overrides": "backend=noop", "git_sha": "0" * 40, "git_dirty": "False", "status": "FINISHED",
            "host": "localhost", "python": "3.11", "device": "none", "ray_executions": "1", "ray_nodes": "0" * 56}
    return tracking.flatten(spec.config), tags


def floor(n: int, workdir: Path, record: bool, tuned_store: bool = False) -> float:
    """Plain Ray tasks; the driver logs each result with MlflowClient: create_run, one
    log_batch, set_terminated. ``record``: the same params and tags a trial's run holds,
    else one param and one metric. ``tuned_store``: the sqlite settings quantsweep uses
    (WAL, synchronous=NORMAL), to tell its store settings from its own cost."""
    import ray
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from orchestrator import store

    params, tags = trial_record() if record else ({"i": "0"}, {})

    @ray.remote
    def noop(i: int) -> dict:
        return {"value": float(i)}

    started = time.perf_counter()
    uri = f"sqlite:///{workdir / f'floor-{record}-{tuned_store}.db'}"
    client = store.client(uri) if tuned_store else MlflowClient(uri)
    experiment = client.create_experiment("floor")
    pending = [noop.remote(i) for i in range(n)]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        result = ray.get(ready[0])
        run = client.create_run(experiment)
        client.log_batch(run.info.run_id, metrics=[Metric("value", result["value"], 0, 0)],
                         params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        client.set_terminated(run.info.run_id)
    return time.perf_counter() - started


def quantsweep(n: int, workdir: Path, fresh_worker: bool) -> float:
    from orchestrator import cli

    store = workdir / f"quantsweep-{fresh_worker}.db"
    args = ["run", "-m", "backend=noop", f"seed=range(0,{n})", f"cluster.fresh_worker_per_trial={fresh_worker}",
            f"tracking.uri=sqlite:///{store}", "sweep.name=overhead"]
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
        code = cli.main(args)
    elapsed = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"orchestrator run failed with exit code {code}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--json", type=Path, default=Path("overhead.json"))
    ap.add_argument("--rounds", type=int, default=3, help="each path runs this often; medians are reported")
    ap.add_argument("--skip-fresh-workers", action="store_true", help="skip the slow fresh-worker-per-trial run")
    args = ap.parse_args()

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    n = args.trials
    paths = {FLOOR: lambda w: floor(n, w, record=False),
             RECORD_FLOOR: lambda w: floor(n, w, record=True),
             TUNED_FLOOR: lambda w: floor(n, w, record=True, tuned_store=True),
             "quantsweep, reused workers": lambda w: quantsweep(n, w, fresh_worker=False)}
    if not args.skip_fresh_workers:
        paths["quantsweep, fresh worker per trial"] = lambda w: quantsweep(n, w, fresh_worker=True)
    totals: dict[str, list[float]] = {name: [] for name in paths}
    with tempfile.TemporaryDirectory() as tmp:
        ray.get([ray.remote(lambda: None).remote() for _ in range(4)])  # warm the worker pool for both
        warm_up_imports(Path(tmp))
        # Rounds interleave the paths, so that a slow spell of the machine falls on all of them.
        for round_ in range(args.rounds):
            for name, path in paths.items():
                workdir = Path(tmp, f"round-{round_}")
                workdir.mkdir(exist_ok=True)
                totals[name].append(path(workdir))
    ray.shutdown()

    rows = {name: statistics.median(values) for name, values in totals.items()}
    base = rows[FLOOR] / n
    table = [{"path": name, "total_s": total, "per_trial_ms": 1000 * total / n, "vs_floor": total / n / base,
              "rounds_s": totals[name]} for name, total in rows.items()]
    print(f"{n} no-op trials, {os.cpu_count()} CPUs, median of {args.rounds} interleaved rounds")
    print("| path | total s | per trial ms | vs floor |")
    print("|---|---|---|---|")
    for r in table:
        print(f"| {r['path']} | {r['total_s']:.2f} | {r['per_trial_ms']:.1f} | {r['vs_floor']:.2f}x |")
    args.json.write_text(json.dumps({"trials": n, "cpus": os.cpu_count(), "rounds": args.rounds, "rows": table},
                                    indent=2))


if __name__ == "__main__":
    main()
