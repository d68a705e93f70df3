"""MLflow layout: one experiment per sweep name, a parent run per sweep, a child run per trial.

Only the driver writes to MLflow (workers return their results by value), so a local
sqlite store sees one writer. Each child costs a few calls: create_run, one log_batch,
its artifacts and set_terminated.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

from jobs.spec import Status, TrialResult, TrialSpec

# Our fine-grained status -> MLflow's run status (the `status` tag keeps ours).
MLFLOW_STATUS = {Status.FINISHED: "FINISHED", Status.UNSUPPORTED: "FINISHED", Status.FAILED: "FAILED",
                 Status.TIMEOUT: "FAILED", Status.CANCELLED: "KILLED"}
PROJECT_ROOT = Path(__file__).resolve().parents[1]
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value


def resolve_uri(configured: Optional[str]) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a sqlite file in the working directory."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted param names (`model.name`, `bench.batch_size`) with string values."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            flat[name] = text[:MAX_PARAM_CHARS]
    return flat


def code_version() -> dict[str, str]:
    """The git sha of the project's code and whether its tree has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": "unknown", "git_dirty": "unknown"}
    if sha.returncode:
        return {"git_sha": "unknown", "git_dirty": "unknown"}
    return {"git_sha": sha.stdout.strip(), "git_dirty": str(bool(dirty.stdout.strip()))}


def run_name(spec: TrialSpec) -> str:
    return " ".join(spec.overrides) or spec.trial_key


class SweepTracker:
    def __init__(self, uri: str, experiment: str, sweep_id: str, tags: dict[str, str]):
        from mlflow.tracking import MlflowClient

        self.uri, self.sweep_id = uri, sweep_id
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.common_tags = {"sweep_id": sweep_id, **code_version()}
        parent = self.client.create_run(self.experiment_id, run_name=sweep_id,
                                        tags={**self.common_tags, **tags, "kind": "sweep"})
        self.parent_id = parent.info.run_id

    def add_trial(self, spec: TrialSpec) -> str:
        from mlflow.entities import Param, RunTag

        run = self.client.create_run(self.experiment_id, run_name=run_name(spec), tags={
            **self.common_tags, "mlflow.parentRunId": self.parent_id, "kind": "trial",
            "trial_key": spec.trial_key, "attempt": str(spec.attempt),
            "status": Status.PENDING.value, "overrides": " ".join(spec.overrides)})
        params = [Param(k, v) for k, v in flatten(spec.config).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(run.info.run_id, params=params[i:i + 100],
                                  tags=[RunTag("trial_key", spec.trial_key)] if i == 0 else [])
        return run.info.run_id

    def mark_running(self, run_id: str, node: str) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag("status", Status.RUNNING.value), RunTag("ray_node", node)])

    def finish_trial(self, run_id: str, spec: TrialSpec, result: TrialResult) -> None:
        import yaml
        from mlflow.entities import Metric, RunTag

        now = _now_ms()
        metrics = [Metric(k, float(v), now, 0) for k, v in result.metrics.items()]
        metrics.append(Metric("duration_s", result.duration_s, now, 0))
        tags = [RunTag("status", result.status.value)] + [RunTag(k, str(v)) for k, v in result.env.items()]
        if result.reason:
            tags.append(RunTag("reason", result.reason[:5000]))
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000], tags=tags if i == 0 else [])
        self.client.log_text(run_id, yaml.safe_dump(spec.config, sort_keys=False), "config.yaml")
        for name, text in result.artifacts.items():
            self.client.log_text(run_id, text, name)
        self.client.set_terminated(run_id, MLFLOW_STATUS[result.status])

    def finish_sweep(self, counts: dict[str, int], status: str = "FINISHED") -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        self.client.log_batch(self.parent_id, metrics=[Metric(f"trials_{k.lower()}", v, now, 0)
                                                        for k, v in counts.items()])
        self.client.set_terminated(self.parent_id, status)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
