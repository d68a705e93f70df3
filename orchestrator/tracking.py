"""MLflow layout: one experiment per sweep name, a parent run per sweep, a child run per trial.

Only the driver writes to MLflow (workers return their results by value, artifacts as
text), so a local sqlite store sees one writer and a remote server needs no shared
filesystem with the workers. Each child costs a few calls: create_run, one log_batch,
its artifacts and set_terminated. The sweep's plan (``plan.json`` on the parent: every cell)
is written first; a trial's run is made when the trial starts, or by its result.

Writes go through the store's writer thread (:class:`orchestrator.store.Writer`).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from jobs.spec import Status, TrialResult, TrialSpec
from orchestrator import store
from orchestrator.paths import PROJECT_ROOT

# Our fine-grained status -> MLflow's run status (the `status` tag keeps ours).
MLFLOW_STATUS = {Status.FINISHED: "FINISHED", Status.UNSUPPORTED: "FINISHED", Status.FAILED: "FAILED",
                 Status.TIMEOUT: "FAILED", Status.CANCELLED: "KILLED"}
CANCEL_TAG = "cancel_requested"
INDEX_FILE, INDEX_TAG = "trials.json", "trial_index"
PLAN_FILE = "plan.json"  # every cell of a sweep, written before any of its trial runs
STUDY_FILE = "study.json"  # an adaptive sweep's study (orchestrator.study), rewritten after each batch
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
LIVE_INDEX_S = 5.0  # how often a running sweep's index is rewritten, at least (see SweepTracker.update_index)


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


def plan_cell(spec: TrialSpec) -> dict[str, Any]:
    """A cell's entry in ``plan.json``."""
    return {"trial_key": spec.trial_key, "overrides": " ".join(spec.overrides), "config": spec.config}


def plan_json(cells: Sequence[dict[str, Any]], settings: dict[str, dict[str, Any]]) -> str:
    """``plan.json``: every cell's key, overrides and config (:func:`plan_cell`), and the sweep's
    STORED_SETTINGS."""
    stored = {section: {k: settings[section][k] for k in keys} for section, keys in STORED_SETTINGS.items()}
    return json.dumps({"trials": list(cells), "settings": stored})


def run_name(spec: TrialSpec) -> str:
    return " ".join(spec.overrides) or spec.trial_key


START_DEADLINE_S = 120.0  # how long the start of a sweep waits for an unreachable store


class SweepTracker:
    """The sweep's parent run, created at once; child runs and results written by a :class:`Writer`."""

    def __init__(self, uri: str, experiment: str, sweep_id: str, tags: dict[str, str],
                 parent_id: Optional[str] = None, prior_rows: Sequence[dict[str, Any]] = (),
                 prior_plan: Sequence[dict[str, Any]] = ()):
        """A new sweep, or with ``parent_id`` an earlier one reopened (resubmission) for more attempts;
        ``prior_rows``: its trials' rows (``orchestrator.sweep_state.TrialRow`` as dicts) before this run, and
        ``prior_plan`` its plan's cells (entries of ``plan.json``), which a plan written now keeps."""
        from mlflow.entities import RunTag

        self.uri, self.sweep_id = uri, sweep_id
        self.client = store.client(uri)
        self.common_tags = {"sweep_id": sweep_id, **code_version()}
        tags = {**tags, "heartbeat": str(time.time())}
        if parent_id is None:
            self.experiment_id = store.retrying(lambda: store.open_experiment(self.client, experiment), START_DEADLINE_S,
                                          "open experiment")
            parent = self.client.create_run(self.experiment_id, run_name=sweep_id,
                                            tags={**self.common_tags, **tags, "kind": "sweep"})
        else:
            parent = store.retrying(lambda: self.client.get_run(parent_id), START_DEADLINE_S, "open the sweep")
            self.experiment_id = parent.info.experiment_id
            self.client.update_run(parent_id, status="RUNNING")
            self.client.log_batch(parent_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.parent_id, self._parent_artifacts = parent.info.run_id, parent.info.artifact_uri
        # trial key -> its row in the sweep's index (``trials.json``): what the store holds of it, so only
        # the writer thread changes it, once a write has landed.
        self.rows: dict[str, dict[str, Any]] = {row["trial_key"]: dict(row) for row in prior_rows}
        self._rows_changed, self._index_due = bool(prior_rows), 0.0
        self._index_queued = threading.Event()
        self._beats = itertools.count(1)
        self.run_ids: dict[str, str] = {}  # trial key -> child run id, once created
        self._tried: set[str] = set()      # trial keys whose run creation was attempted
        self._finished: set[str] = set()   # trial keys whose result has been handed to the writer
        self._artifact_uris: dict[str, str] = {}
        self._config_stored: set[str] = set()  # trial keys whose config.yaml is uploaded (writer thread only)
        self._planned: dict[str, dict[str, Any]] = {cell["trial_key"]: cell for cell in prior_plan}
        self.writer = store.Writer()

    def mark_running(self, spec: TrialSpec, node: str, execution: int) -> None:
        """A trial's run is made when it starts (the sweep's plan.json lists the cells not started).
        The write is deferrable: a fast trial's result, if first, makes the run in one go."""
        tags = {"status": Status.RUNNING.value, "ray_node": node, "ray_executions": str(execution)}
        self.writer.submit(f"mark trial {spec.trial_key} running", self._start_trial, spec, tags, deferrable=True)

    def finish_trial(self, spec: TrialSpec, result: TrialResult, extra_tags: Optional[dict[str, str]] = None) -> None:
        self._finished.add(spec.trial_key)
        self.writer.submit(f"record trial {spec.trial_key} ({result.status.value})", self._finish_trial, spec,
                           result, extra_tags or {})

    def finish_sweep(self, status: str = "FINISHED") -> None:
        """The sweep's final index and counts (over every trial key, earlier attempts included), then its end."""
        self.writer.submit("write the sweep's trial index", self._write_index)
        self.writer.submit("record the sweep's counts", self._record_counts)
        self.writer.submit("end the sweep's run", self.client.set_terminated, self.parent_id, status)

    def update_index(self) -> None:
        """While the sweep runs: the index again, if trials changed since it was written and it is due (every
        LIVE_INDEX_S, longer for a large sweep), so that `orchestrator status` reads one file, not every run.
        At most one such write waits in the writer's queue."""
        if not self._rows_changed or self._index_queued.is_set() or time.monotonic() < self._index_due:
            return
        self._index_queued.set()
        self._index_due = time.monotonic() + max(LIVE_INDEX_S, len(self.rows) / 1000)
        self.writer.submit("update the sweep's trial index", self._write_index)

    def _record_counts(self) -> None:
        from mlflow.entities import Metric

        counts = Counter(row["status"] for row in self.rows.values())
        self.client.log_batch(self.parent_id, metrics=[Metric(f"trials_{s.value.lower()}", counts.get(s.value, 0),
                                                              now_ms(), 0) for s in Status if s.is_final])

    def _write_index(self) -> None:
        """``trials.json`` on the parent run: one row per trial key as the store holds it (pending, running or
        ended), and when it was written. The tag ``trial_index`` vouches for it; whatever changes trial runs
        behind the driver's back deletes the tag (:func:`invalidate_index`). A driver killed mid-sweep leaves
        its last one, which `status` shows as of then."""
        self._index_queued.clear()
        self._rows_changed = False
        token = secrets.token_hex(8)
        rows = list(self.rows.values())
        self._upload_to_parent(INDEX_FILE, json.dumps({"token": token, "written_at": round(time.time(), 3),
                                                       "trials": rows}))
        self.client.set_tag(self.parent_id, INDEX_TAG, token)

    def _set_row(self, spec: TrialSpec, status: str, reason: str, executions: int) -> None:
        """The trial's row, once its run holds ``status`` (writer thread only)."""
        self.rows[spec.trial_key] = {
            "trial_key": spec.trial_key, "overrides": " ".join(spec.overrides), "status": status,
            "attempts": spec.attempt, "latest_attempt": spec.attempt, "reason": reason, "run_id":
                self.run_ids[spec.trial_key], "executions": executions}
        self._rows_changed = True

    def write_plan(self, specs: Sequence[TrialSpec], settings: dict[str, dict[str, Any]]) -> None:
        """``plan.json`` on the parent run, ahead of any trial's run: every cell's key, overrides and
        config, so that `orchestrator resume` finds the trials a killed driver never made runs for, and
        the sweep's settings (``settings``: a composed config's sections), to run them as the sweep did;
        then the index, the new cells pending. A study writes it again before each batch, with the cells
        planned before it (and those of the sweep's earlier drivers)."""
        for spec in specs:
            if spec.trial_key not in self._planned:
                self._planned[spec.trial_key] = plan_cell(spec)
        self.writer.submit("store the sweep's plan", self._store_plan, specs,
                           plan_json(list(self._planned.values()), settings))

    def write_study(self, text: str) -> None:
        """``study.json`` on the parent run (orchestrator.study): the study's definition and its trials."""
        self.writer.submit("store the study", self._upload_to_parent, STUDY_FILE, text)

    def _store_plan(self, specs: Sequence[TrialSpec], text: str) -> None:
        self._upload_to_parent(PLAN_FILE, text)
        for spec in specs:
            self.rows.setdefault(spec.trial_key, {
                "trial_key": spec.trial_key, "overrides": " ".join(spec.overrides), "status": Status.PENDING.value,
                "attempts": 0, "latest_attempt": 0, "reason": "not started", "run_id": "", "executions": 0})
        self._write_index()

    def _upload_to_parent(self, name: str, text: str) -> None:
        store.upload_texts(self._parent_artifacts, self.uri, {name: text})

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

    def heartbeat(self, in_flight: int, longest_gap_s: float) -> None:
        """Say the driver is alive (resubmission tells a dead driver from a running one by it), and how it
        fares, as metrics on the parent run: its memory, the MLflow writes waiting, the trials handed to Ray,
        and the longest its progress bar went without an update since the last heartbeat."""
        from mlflow.entities import Metric, RunTag

        import psutil

        now, step = now_ms(), next(self._beats)
        metrics = [Metric("driver_rss_mib", psutil.Process().memory_info().rss / 2 ** 20, now, step),
                   Metric("driver_pending_writes", self.writer.pending, now, step),
                   Metric("driver_trials_in_flight", in_flight, now, step),
                   Metric("driver_progress_gap_s", longest_gap_s, now, step)]
        self.writer.submit("heartbeat", self.client.log_batch, self.parent_id, metrics,
                           [], [RunTag("heartbeat", str(time.time()))])

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
        self._set_row(spec, Status.RUNNING.value, "", int(tags["ray_executions"]))
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
        store.upload_texts(self._artifact_uris[key], self.uri, files)

    def _finish_trial(self, spec: TrialSpec, result: TrialResult, extra_tags: dict[str, str]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        key = spec.trial_key
        record = trial_record(spec, result, extra_tags, now_ms())
        made_now = self._ensure_run(spec, record.tags)  # with the record's tags: none left to log
        tags = [] if made_now else [RunTag(k, v) for k, v in record.tags.items()]
        params = [Param(k, v) for k, v in record.params.items()]
        metrics = [Metric(*m) for m in record.metrics]
        for batch in _batches(params, metrics, tags):
            self.client.log_batch(self.run_ids[key], **batch)
        files = {k: v for k, v in record.files.items() if k != "config.yaml" or key not in self._config_stored}
        if files:
            self._upload(key, files)
        self.client.set_terminated(self.run_ids[key], record.mlflow_status)
        self._set_row(spec, result.status.value, result.reason or "", int(extra_tags.get("ray_executions", 0)))


@dataclass(frozen=True)
class TrialRecord:
    """What a trial's MLflow run holds once the trial has ended; made without the store."""
    tags: dict[str, str]
    params: dict[str, str]  # the flattened resolved config
    metrics: list[tuple[str, float, int, int]]  # (name, value, timestamp ms, step)
    files: dict[str, str]  # artifact name -> text
    mlflow_status: str


def ending_tags(status: Status, reason: Optional[str]) -> dict[str, str]:
    """The tags that say how a trial's attempt ended (also for runs a lost driver left open)."""
    return {"status": status.value, **({"reason": reason[:5000]} if reason else {})}


def trial_record(spec: TrialSpec, result: TrialResult, extra_tags: dict[str, str], now: int) -> TrialRecord:
    """A trial's result as its run's contents: its environment and ``extra_tags`` (where it ran,
    what it reused) as tags, its config as params and ``config.yaml``, metrics at ``now`` (ms)
    and the samples of its series."""
    metrics = [(k, float(v), now, 0) for k, v in result.metrics.items()]
    metrics.append(("duration_s", result.duration_s, now, 0))
    metrics += [(k, v, ts, step) for k, samples in result.series.items() for ts, step, v in samples]
    tags = {**{k: str(v) for k, v in {**result.env, **extra_tags}.items()}, **ending_tags(result.status, result.reason)}
    return TrialRecord(tags, flatten(spec.config), metrics, {**result.artifacts, "config.yaml": config_yaml(spec.config)},
                       MLFLOW_STATUS[result.status])


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
