"""MLflow layout: one experiment per sweep name, a parent run per sweep, a child run per trial.

Only the driver writes to MLflow (workers return their results by value, artifacts as
text), so a local sqlite store sees one writer and a remote server needs no shared
filesystem with the workers. Each child costs a few calls: create_run, one log_batch,
its artifacts and set_terminated. The sweep's plan (``plan.json`` on the parent: every cell)
is written first; a trial's run is made when the trial starts, or by its result.

While trials run, writes go through a :class:`Writer` thread: the sweep loop never waits
on the store, and a write that fails because the store is unreachable (a server
restarting) is retried, in order, until it lands.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from collections import Counter
from typing import Any, Callable, Optional, Sequence

from jobs.spec import Status, TrialResult, TrialSpec
from orchestrator.paths import PROJECT_ROOT

# Our fine-grained status -> MLflow's run status (the `status` tag keeps ours).
MLFLOW_STATUS = {Status.FINISHED: "FINISHED", Status.UNSUPPORTED: "FINISHED", Status.FAILED: "FAILED",
                 Status.TIMEOUT: "FAILED", Status.CANCELLED: "KILLED"}
CANCEL_TAG = "cancel_requested"
INDEX_FILE, INDEX_TAG = "trials.json", "trial_index"
PLAN_FILE = "plan.json"  # every cell of a sweep, written before any of its trial runs
# The sweep's settings stored with its plan, so a resubmission runs as the sweep did. Not where
# the cluster and the store are (an address read back from the store is never followed), nor the
# sweep's name and id, which the store itself gives.
STORED_SETTINGS = {
    "cluster": ("name", "num_cpus", "max_retries", "max_concurrent_trials", "autoscaling", "fresh_worker_per_trial"),
    "tracking": ("flush_timeout_s", "system_metrics_interval_s"),
    "sweep": ("report",),
}
# Tags that place a run in the layout (which sweep, which trial, what state), not results.
RUN_LAYOUT_TAGS = {"sweep_id", "trial_key", "attempt", "status", "overrides", "kind", "git_sha", "git_dirty",
                   "resubmit_overrides", "reason", "reused_from", "reused_from_sweep"}
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value


def resolve_uri(configured: Optional[str]) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a sqlite file in the working directory;
    without its credentials, which go to MLflow's environment variables (orchestrator.credentials)."""
    from orchestrator import credentials

    if configured:
        return credentials.take_from_uri(configured)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = credentials.take_from_uri(os.environ["MLFLOW_TRACKING_URI"])
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def ui_url(uri: str, experiment_id: str) -> Optional[str]:
    """The MLflow UI's runs table of an experiment on a tracking server (its GenAI view is the default)."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


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


CODE_VERSION_ENV = {"git_sha": "QUANTSWEEP_GIT_SHA", "git_dirty": "QUANTSWEEP_GIT_DIRTY"}


def code_version_env() -> dict[str, str]:
    """:func:`code_version` as environment variables, for a driver started where there is no .git."""
    return {CODE_VERSION_ENV[k]: v for k, v in code_version().items()}


def code_version() -> dict[str, str]:
    """The git sha of the project's code and whether its tree has uncommitted changes (from the
    environment where `orchestrator submit` put them)."""
    if all(name in os.environ for name in CODE_VERSION_ENV.values()):
        return {k: os.environ[name] for k, name in CODE_VERSION_ENV.items()}
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


# Signs of a service (an MLflow store, a Ray dashboard) unreachable or not ready for now, not of
# a bad request: worth retrying.
TRANSIENT = ("max retries exceeded", "connection refused", "connection reset", "connection aborted",
             "failed to establish", "timed out", "database is locked", "temporarily unavailable",
             "bad gateway", "service unavailable", "remote end closed", "try again later")
RETRY_DELAYS_S = (0.5, 1, 2, 4, 5)  # then every 5 s


def is_transient(error: BaseException) -> bool:
    seen: Optional[BaseException] = error
    while seen is not None:
        if any(t in str(seen).lower() for t in TRANSIENT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retrying(fn: Callable[[], Any], deadline_s: float, what: str, service: str = "mlflow: store") -> Any:
    """Call ``fn`` until it succeeds, retrying transient errors of ``service`` for up to ``deadline_s``."""
    started = time.monotonic()
    for attempt in range(10 ** 9):
        try:
            return fn()
        except Exception as error:
            if not is_transient(error) or time.monotonic() - started > deadline_s:
                raise
            if attempt == 0:
                print(f"{what}: {service} unreachable, retrying ({str(error).splitlines()[0][:160]})",
                      file=sys.stderr)
            time.sleep(RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)])


class Writer:
    """Runs MLflow writes on one thread, each retried while the store is unreachable. ``flush``
    waits for all of them. Writes run in submission order, except that ``deferrable`` ones (a
    trial's start, which makes its run) yield to the rest: when results come faster than runs can
    be made, a result's record makes its run itself, in fewer writes, and the deferred one is a no-op."""

    def __init__(self) -> None:
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self.errors: list[str] = []  # writes refused by the store (not transient): reported, not retried
        self._thread = threading.Thread(target=self._work, name="mlflow-writer", daemon=True)
        self._thread.start()

    def submit(self, what: str, fn: Callable, *args, deferrable: bool = False) -> None:
        self._queue.put((deferrable, next(self._order), what, fn, args))

    def _work(self) -> None:
        while True:
            _, _, what, fn, args = self._queue.get()
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


SWEEP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_sweep_id(sweep_id: str, key: str) -> None:
    """Sweep ids go into MLflow search filters: letters, digits, '_', '.', '-' only."""
    from orchestrator.errors import ConfigError

    if not SWEEP_ID.fullmatch(str(sweep_id)):
        raise ConfigError(key, sweep_id, "letters, digits, '_', '.' and '-' (at most 64), e.g. swp-7f3a2c")


def invalidate_index(mlflow_client, parent_id: str) -> None:
    """Trial runs are about to change outside a driver: `status` must read the runs themselves."""
    try:
        mlflow_client.delete_tag(parent_id, INDEX_TAG)
    except Exception as error:  # no index yet is fine; anything else is not
        if "no tag" not in str(error).lower() and "not found" not in str(error).lower():
            raise


def run_name(spec: TrialSpec) -> str:
    return " ".join(spec.overrides) or spec.trial_key


def client(uri: str):
    """An MlflowClient whose HTTP calls fail fast when the server is down: :func:`retrying`
    and the :class:`Writer` retry them, with backoff the sweep can see and bound."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    # MLflow creates a new store's tables on first use; two drivers doing that at once on one
    # new file crash in its schema migration. One at a time (the lock is a file beside it).
    with FileLock(str(db.parent / f".{db.name}.init-lock")):
        _use_wal(db)
        mlflow_client = MlflowClient(tracking_uri=uri)
        _sync_wal_at_checkpoints(mlflow_client)
    return mlflow_client


PROBE_TIMEOUT_S = 5.0


def connect(uri: str):
    """A client of ``uri`` once the store has answered: a dead or wrong store is bad input, one
    line (ConfigError) within seconds, before anything is submitted. An outage later in a sweep
    is retried (:class:`Writer`)."""
    import socket
    from urllib.parse import urlsplit

    from orchestrator.errors import ConfigError

    allowed = "allowed: a reachable MLflow tracking server (http[s]://host:port), a sqlite:///path file, or unset"
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        try:
            socket.create_connection((parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)),
                                     timeout=PROBE_TIMEOUT_S).close()
        except OSError as error:
            raise ConfigError("tracking.uri", uri, allowed,
                              problem=f"unreachable ({error.strerror or type(error).__name__})") from None
    try:
        mlflow_client = client(uri)
        mlflow_client.search_experiments(max_results=1)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ConfigError("tracking.uri", uri, allowed, problem=f"not a store this can use ({first})") from None
    return mlflow_client


def _use_wal(db: Path) -> None:
    """Put a local sqlite store in write-ahead-log mode (a setting the file keeps): a commit
    costs one fsync instead of several, and readers (`orchestrator status`, the MLflow UI)
    never block the sweep's writer, nor it them."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


def _sync_wal_at_checkpoints(mlflow_client) -> None:
    """``PRAGMA synchronous=NORMAL`` on the store's connections: in WAL mode a commit then
    appends to the log without an fsync, and the log is synced at checkpoints. A crash of the
    driver loses nothing; a power cut may lose the last commits, never the file's integrity."""
    from sqlalchemy import event

    engine = getattr(getattr(getattr(mlflow_client, "_tracking_client", None), "store", None), "engine", None)
    if engine is None:  # MLflow moved its store: stay correct, only slower
        return
    if not event.contains(engine, "connect", _synchronous_normal):  # MLflow shares one engine per URI
        event.listen(engine, "connect", _synchronous_normal)
        engine.dispose()  # pooled connections made before the listener reconnect with it


def _synchronous_normal(dbapi_connection, _record) -> None:
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


START_DEADLINE_S = 120.0  # how long the start of a sweep waits for an unreachable store


# MLflow 3's UI opens an experiment on its GenAI overview unless the experiment says it holds
# classic training runs: then on its runs table.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def open_experiment(mlflow_client, name: str) -> str:
    """The id of experiment ``name``, made if new; safe when other drivers make it at the same moment."""
    from mlflow.exceptions import MlflowException

    from orchestrator.errors import ConfigError

    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        try:
            return mlflow_client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = mlflow_client.get_experiment_by_name(name)  # another driver made it first
    if found.lifecycle_stage != "active":
        raise ConfigError("sweep.name", name, "a new name, or restore the experiment (mlflow experiments restore "
                          f"--experiment-id {found.experiment_id})", problem="its experiment is deleted in the store")
    if EXPERIMENT_KIND[0] not in found.tags:  # made by an earlier version, or by hand
        mlflow_client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
    return found.experiment_id


class SweepTracker:
    """The sweep's parent run, created at once; child runs and results written by a :class:`Writer`."""

    def __init__(self, uri: str, experiment: str, sweep_id: str, tags: dict[str, str],
                 parent_id: Optional[str] = None, prior_rows: Sequence[dict[str, Any]] = ()):
        """A new sweep, or with ``parent_id`` an earlier one reopened (resubmission) for more attempts;
        ``prior_rows``: its trials' rows (``orchestrator.status.TrialRow`` as dicts) before this run."""
        from mlflow.entities import RunTag

        self.uri, self.sweep_id = uri, sweep_id
        self.client = client(uri)
        self.common_tags = {"sweep_id": sweep_id, **code_version()}
        tags = {**tags, "heartbeat": str(time.time())}
        if parent_id is None:
            self.experiment_id = retrying(lambda: open_experiment(self.client, experiment), START_DEADLINE_S,
                                          "open experiment")
            parent = self.client.create_run(self.experiment_id, run_name=sweep_id,
                                            tags={**self.common_tags, **tags, "kind": "sweep"})
        else:
            parent = retrying(lambda: self.client.get_run(parent_id), START_DEADLINE_S, "open the sweep")
            self.experiment_id = parent.info.experiment_id
            self.client.update_run(parent_id, status="RUNNING")
            self.client.log_batch(parent_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.parent_id, self._parent_artifacts = parent.info.run_id, parent.info.artifact_uri
        # trial key -> its row in the sweep's index (see write_index), latest attempt first
        self.index: dict[str, dict[str, Any]] = {row["trial_key"]: dict(row) for row in prior_rows}
        self.run_ids: dict[str, str] = {}  # trial key -> child run id, once created
        self._tried: set[str] = set()      # trial keys whose run creation was attempted
        self._finished: set[str] = set()   # trial keys whose result has been handed to the writer
        self._artifact_uris: dict[str, str] = {}
        self._config_stored: set[str] = set()  # trial keys whose config.yaml is uploaded (writer thread only)
        self.writer = Writer()

    def mark_running(self, spec: TrialSpec, node: str, execution: int) -> None:
        """A trial's run is made when it starts (the sweep's plan.json lists the cells not started).
        The write is deferrable: a fast trial's result, if first, makes the run in one go."""
        tags = {"status": Status.RUNNING.value, "ray_node": node, "ray_executions": str(execution)}
        self.writer.submit(f"mark trial {spec.trial_key} running", self._start_trial, spec, tags, deferrable=True)

    def finish_trial(self, spec: TrialSpec, result: TrialResult, extra_tags: Optional[dict[str, str]] = None) -> None:
        self._finished.add(spec.trial_key)
        self.index[spec.trial_key] = {
            "trial_key": spec.trial_key, "overrides": " ".join(spec.overrides), "status": result.status.value,
            "attempts": spec.attempt, "latest_attempt": spec.attempt, "reason": result.reason or "", "run_id": None,
            "executions": int((extra_tags or {}).get("ray_executions", 0))}
        self.writer.submit(f"record trial {spec.trial_key} ({result.status.value})", self._finish_trial, spec,
                           result, extra_tags or {})

    @staticmethod
    def count_metrics(counts: dict[str, int]) -> list:
        from mlflow.entities import Metric

        return [Metric(f"trials_{s.value.lower()}", counts.get(s.value, 0), now_ms(), 0) for s in Status if s.is_final]

    @staticmethod
    def record_counts(mlflow_client, parent_id: str, counts: dict[str, int]) -> None:
        """The sweep's trial counts (latest attempt of each key) on its parent run."""
        mlflow_client.log_batch(parent_id, metrics=SweepTracker.count_metrics(counts))

    def finish_sweep(self, status: str = "FINISHED") -> None:
        """The sweep's index and counts (over every trial key, earlier attempts included), then its end."""
        counts = Counter(row["status"] for row in self.index.values())
        self.writer.submit("write the sweep's trial index", self._write_index)
        self.writer.submit("record the sweep's counts", self.record_counts, self.client, self.parent_id, counts)
        self.writer.submit("end the sweep's run", self.client.set_terminated, self.parent_id, status)

    def _write_index(self) -> None:
        """``trials.json`` on the parent run: one row per trial key, so that `orchestrator status` on a
        finished sweep reads one file instead of every run. The tag ``trial_index`` vouches for it;
        whatever changes trial runs behind the driver's back deletes the tag (:func:`invalidate_index`)."""
        token = secrets.token_hex(8)
        rows = [{**row, "run_id": row["run_id"] or self.run_ids.get(key)} for key, row in self.index.items()]
        self._upload_to_parent(INDEX_FILE, json.dumps({"token": token, "trials": rows}))
        self.client.set_tag(self.parent_id, INDEX_TAG, token)

    def write_plan(self, specs: Sequence[TrialSpec], settings: dict[str, dict[str, Any]]) -> None:
        """``plan.json`` on the parent run, ahead of any trial's run: every cell's key, overrides and
        config, so that `orchestrator resume` finds the trials a killed driver never made runs for, and
        the sweep's settings (``settings``: a composed config's sections), to run them as the sweep did."""
        plan = [{"trial_key": s.trial_key, "overrides": " ".join(s.overrides), "config": s.config} for s in specs]
        stored = {section: {k: settings[section][k] for k in keys} for section, keys in STORED_SETTINGS.items()}
        self.writer.submit("store the sweep's plan", self._upload_to_parent, PLAN_FILE,
                           json.dumps({"trials": plan, "settings": stored}))

    def _upload_to_parent(self, name: str, text: str) -> None:
        upload_texts(self._parent_artifacts, self.uri, {name: text})

    def finished_elsewhere(self, keys: set[str]) -> dict[str, Any]:
        """The FINISHED trial runs of earlier sweeps in this experiment, by trial key (the latest of each)."""
        found: dict[str, Any] = {}
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], max_results=1000, page_token=token, order_by=["attributes.start_time DESC"],
                filter_string=f"tags.kind = 'trial' AND tags.status = 'FINISHED' AND tags.sweep_id != '{self.sweep_id}'")
            for run in page:
                found.setdefault(run.data.tags.get("trial_key"), run)
            token = page.token
            if not token:
                return {k: run for k, run in found.items() if k in keys}

    def heartbeat(self) -> None:
        """Say the driver is alive (resubmission tells a dead driver from a running one by it)."""
        self.writer.submit("heartbeat", self.client.set_tag, self.parent_id, "heartbeat", str(time.time()))

    def cancel_requested(self) -> bool:
        """Whether `orchestrator cancel` asked this sweep to stop (a tag on the parent run)."""
        return self.client.get_run(self.parent_id).data.tags.get(CANCEL_TAG) == "true"

    def _start_trial(self, spec: TrialSpec, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        key = spec.trial_key
        if key in self._finished:
            return  # done before the writer got here: its result's record makes the run
        if not self._ensure_run(spec, tags):  # a second execution (Ray retried it), or a retried write
            self.client.log_batch(self.run_ids[key], tags=[RunTag(k, v) for k, v in tags.items()])
        if key not in self._config_stored:  # stored from the start: resubmission reads it back
            self._upload(key, {"config.yaml": config_yaml(spec.config)})
            self._config_stored.add(key)

    def _ensure_run(self, spec: TrialSpec, tags: dict[str, str]) -> bool:
        """Create the trial's run with its layout tags and ``tags``, unless it exists; whether it was made now."""
        key = spec.trial_key
        if key in self.run_ids:
            return False
        # A retried create_run whose first try reached the server must not make a second run.
        found = self.client.search_runs([self.experiment_id], max_results=1, filter_string=(
            f"tags.sweep_id = '{self.sweep_id}' AND tags.trial_key = '{key}' AND tags.attempt = '{spec.attempt}'")
        ) if key in self._tried else []
        self._tried.add(key)
        run = found[0] if found else self.client.create_run(
            self.experiment_id, run_name=run_name(spec), tags={
                **self.common_tags, "mlflow.parentRunId": self.parent_id, "kind": "trial", "trial_key": key,
                "attempt": str(spec.attempt), "overrides": " ".join(spec.overrides),
                **({"resubmit_overrides": " ".join(spec.resubmit_overrides)} if spec.attempt > 1 else {}), **tags})
        self.run_ids[key], self._artifact_uris[key] = run.info.run_id, run.info.artifact_uri
        return not found

    def _upload(self, key: str, files: dict[str, str]) -> None:
        upload_texts(self._artifact_uris[key], self.uri, files)

    def _finish_trial(self, spec: TrialSpec, result: TrialResult, extra_tags: dict[str, str]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        key = spec.trial_key
        now = now_ms()
        metrics = [Metric(k, float(v), now, 0) for k, v in result.metrics.items()]
        metrics.append(Metric("duration_s", result.duration_s, now, 0))
        metrics += [Metric(k, v, ts, step) for k, samples in result.series.items() for ts, step, v in samples]
        tags = {"status": result.status.value, **{k: str(v) for k, v in {**result.env, **extra_tags}.items()}}
        if result.reason:
            tags["reason"] = result.reason[:5000]
        if self._ensure_run(spec, tags):
            tags = {}
        tags = [RunTag(k, v) for k, v in tags.items()]
        params = [Param(k, v) for k, v in flatten(spec.config).items()]
        for batch in _batches(params, metrics, tags):
            self.client.log_batch(self.run_ids[key], **batch)
        files = dict(result.artifacts)
        if key not in self._config_stored:
            files["config.yaml"] = config_yaml(spec.config)
        if files:
            self._upload(key, files)
        self.client.set_terminated(self.run_ids[key], MLFLOW_STATUS[result.status])


def upload_texts(artifact_uri: str, tracking_uri: str, files: dict[str, str]) -> None:
    """Write text artifacts straight to a run's artifact store (no tracking calls): into its folder
    when the store is a local one, else one upload of a temporary folder."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    repo = get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
    if isinstance(repo, LocalArtifactRepository):
        _write_texts(Path(repo.artifact_dir), files)
        return
    with tempfile.TemporaryDirectory() as tmp:
        _write_texts(Path(tmp), files)
        repo.log_artifacts(tmp)


def _write_texts(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def config_yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.dump(config, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)


def _batches(params: list, metrics: list, tags: list) -> list[dict]:
    """Split into log_batch calls within MLflow's limits (100 params, 100 tags, 1000 entities);
    usually one call."""
    batches = []
    while params or metrics or tags or not batches:
        p, t = params[:100], tags[:100]
        m = metrics[:1000 - len(p) - len(t)]
        batches.append({"params": p, "metrics": m, "tags": t})
        params, tags, metrics = params[len(p):], tags[len(t):], metrics[len(m):]
    return batches


def now_ms() -> int:
    import time

    return int(time.time() * 1000)
