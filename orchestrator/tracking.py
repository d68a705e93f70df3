"""MLflow layout: one experiment per sweep name, a parent run per sweep, a child run per trial.

Only the driver writes to MLflow (workers return their results by value, artifacts as
text), so a local sqlite store sees one writer and a remote server needs no shared
filesystem with the workers. Each child costs a few calls: create_run, one log_batch,
its artifacts and set_terminated.

While trials run, writes go through a :class:`Writer` thread: the sweep loop never waits
on the store, and a write that fails because the store is unreachable (a server
restarting) is retried, in order, until it lands.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from jobs.spec import Status, TrialResult, TrialSpec

# Our fine-grained status -> MLflow's run status (the `status` tag keeps ours).
MLFLOW_STATUS = {Status.FINISHED: "FINISHED", Status.UNSUPPORTED: "FINISHED", Status.FAILED: "FAILED",
                 Status.TIMEOUT: "FAILED", Status.CANCELLED: "KILLED"}
PROJECT_ROOT = Path(__file__).resolve().parents[1]
CANCEL_TAG = "cancel_requested"
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


# Signs of a store that is unreachable for now, not of a bad request: worth retrying.
TRANSIENT = ("max retries exceeded", "connection refused", "connection reset", "connection aborted",
             "failed to establish", "timed out", "database is locked", "temporarily unavailable",
             "bad gateway", "service unavailable", "remote end closed")
RETRY_DELAYS_S = (0.5, 1, 2, 4, 5)  # then every 5 s


def is_transient(error: BaseException) -> bool:
    seen: Optional[BaseException] = error
    while seen is not None:
        if any(t in str(seen).lower() for t in TRANSIENT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retrying(fn: Callable[[], Any], deadline_s: float, what: str) -> Any:
    """Call ``fn`` until it succeeds, retrying transient store errors for up to ``deadline_s``."""
    started = time.monotonic()
    for attempt in range(10 ** 9):
        try:
            return fn()
        except Exception as error:
            if not is_transient(error) or time.monotonic() - started > deadline_s:
                raise
            if attempt == 0:
                print(f"mlflow: {what}: store unreachable, retrying ({str(error).splitlines()[0][:160]})",
                      file=sys.stderr)
            time.sleep(RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)])


class Writer:
    """Runs MLflow writes on one thread, in submission order, each retried while the store
    is unreachable. ``flush`` waits for all of them."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self.errors: list[str] = []  # writes refused by the store (not transient): reported, not retried
        self._thread = threading.Thread(target=self._work, name="mlflow-writer", daemon=True)
        self._thread.start()

    def submit(self, what: str, fn: Callable, *args) -> None:
        self._queue.put((what, fn, args))

    def _work(self) -> None:
        while True:
            what, fn, args = self._queue.get()
            try:
                retrying(lambda: fn(*args), float("inf"), what)
            except Exception as error:
                self.errors.append(f"{what}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
            finally:
                self._queue.task_done()

    @property
    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def flush(self, timeout_s: float) -> bool:
        """Wait until every submitted write is done; False if some are still pending after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.pending


def run_name(spec: TrialSpec) -> str:
    return " ".join(spec.overrides) or spec.trial_key


def client(uri: str):
    """An MlflowClient whose HTTP calls fail fast when the server is down: :func:`retrying`
    and the :class:`Writer` retry them, with backoff the sweep can see and bound."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return MlflowClient(tracking_uri=uri)


START_DEADLINE_S = 120.0  # how long the start of a sweep waits for an unreachable store


class SweepTracker:
    """The sweep's parent run, created at once; child runs and results written by a :class:`Writer`."""

    def __init__(self, uri: str, experiment: str, sweep_id: str, tags: dict[str, str]):
        self.uri, self.sweep_id = uri, sweep_id
        self.client = client(uri)
        found = retrying(lambda: self.client.get_experiment_by_name(experiment), START_DEADLINE_S, "open experiment")
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.common_tags = {"sweep_id": sweep_id, **code_version()}
        parent = self.client.create_run(self.experiment_id, run_name=sweep_id,
                                        tags={**self.common_tags, **tags, "kind": "sweep"})
        self.parent_id = parent.info.run_id
        self.run_ids: dict[str, str] = {}  # trial key -> child run id, once created
        self._tried: set[str] = set()      # trial keys whose run creation was attempted
        self.writer = Writer()

    def add_trial(self, spec: TrialSpec) -> None:
        self.writer.submit(f"create the run of trial {spec.trial_key}", self._create_trial, spec)

    def mark_running(self, key: str, node: str, execution: int) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag("status", Status.RUNNING.value), RunTag("ray_node", node),
                RunTag("ray_executions", str(execution))]
        self.writer.submit(f"mark trial {key} running", lambda: self.client.log_batch(self.run_ids[key], tags=tags))

    def finish_trial(self, spec: TrialSpec, result: TrialResult, extra_tags: Optional[dict[str, str]] = None) -> None:
        self.writer.submit(f"record trial {spec.trial_key} ({result.status.value})", self._finish_trial, spec,
                           result, extra_tags or {})

    def finish_sweep(self, counts: dict[str, int], status: str = "FINISHED") -> None:
        from mlflow.entities import Metric

        metrics = [Metric(f"trials_{k.lower()}", v, _now_ms(), 0) for k, v in counts.items()]
        self.writer.submit("record the sweep's counts", self.client.log_batch, self.parent_id, metrics)
        self.writer.submit("end the sweep's run", self.client.set_terminated, self.parent_id, status)

    def cancel_requested(self) -> bool:
        """Whether `orchestrator cancel` asked this sweep to stop (a tag on the parent run)."""
        return self.client.get_run(self.parent_id).data.tags.get(CANCEL_TAG) == "true"

    def _create_trial(self, spec: TrialSpec) -> None:
        from mlflow.entities import Param, RunTag

        key = spec.trial_key
        if key in self.run_ids:  # an earlier try got as far as creating it
            run_id = self.run_ids[key]
        else:
            # A retried create_run whose first try reached the server must not make a second run.
            found = self.client.search_runs([self.experiment_id], max_results=1, filter_string=(
                f"tags.sweep_id = '{self.sweep_id}' AND tags.trial_key = '{key}'")) if key in self._tried else []
            self._tried.add(key)
            run_id = found[0].info.run_id if found else self.client.create_run(
                self.experiment_id, run_name=run_name(spec), tags={
                    **self.common_tags, "mlflow.parentRunId": self.parent_id, "kind": "trial", "trial_key": key,
                    "attempt": str(spec.attempt), "status": Status.PENDING.value,
                    "overrides": " ".join(spec.overrides)}).info.run_id
            self.run_ids[key] = run_id
        params = [Param(k, v) for k, v in flatten(spec.config).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(run_id, params=params[i:i + 100])

    def _finish_trial(self, spec: TrialSpec, result: TrialResult, extra_tags: dict[str, str]) -> None:
        import yaml
        from mlflow.entities import Metric, RunTag

        run_id = self.run_ids[spec.trial_key]
        now = _now_ms()
        metrics = [Metric(k, float(v), now, 0) for k, v in result.metrics.items()]
        metrics.append(Metric("duration_s", result.duration_s, now, 0))
        tags = [RunTag("status", result.status.value)] + [RunTag(k, str(v)) for k, v in
                                                          {**result.env, **extra_tags}.items()]
        if result.reason:
            tags.append(RunTag("reason", result.reason[:5000]))
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000], tags=tags if i == 0 else [])
        self.client.log_text(run_id, yaml.safe_dump(spec.config, sort_keys=False), "config.yaml")
        for name, text in result.artifacts.items():
            self.client.log_text(run_id, text, name)
        self.client.set_terminated(run_id, MLFLOW_STATUS[result.status])


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
