"""A sweep's state, read back from MLflow: the parent run, and one row per trial key.

A finished sweep is read from its index (``trials.json`` on the parent run, written by
the driver at the end and vouched for by a tag). A running one, or one whose runs were
changed since, is read from its runs: found by their tags (``sweep_id``, ``kind``), a page
of 1000 at a time. A trial key may have several runs, one per
attempt (resubmissions); its row shows the latest attempt.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from jobs.spec import Status
from orchestrator import tracking
from orchestrator.errors import ConfigError

PAGE = 1000


@dataclass
class TrialRow:
    trial_key: str
    overrides: str
    status: str
    attempts: int
    latest_attempt: int  # the latest run's attempt tag (-1: not a positive integer; 0: no run yet)
    reason: str
    run_id: str
    executions: int  # Ray executions of the latest attempt (more than 1: retried after a node/worker died)


@dataclass
class SweepState:
    sweep_id: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_status: str  # MLflow status of the parent run: RUNNING while the driver works
    tags: dict[str, str]
    trials: list[TrialRow] = field(default_factory=list)

    @property
    def counts(self) -> Counter:
        return Counter(t.status for t in self.trials)

    def to_json(self) -> str:
        data = asdict(self)
        data["counts"] = dict(self.counts)
        data.pop("tags")
        data["ray_job"] = self.tags.get("ray_job_submission_id")
        return json.dumps(data, indent=2)


def find_parent(client, sweep_id: str):
    """The parent run of ``sweep_id`` in any experiment, or None."""
    experiments, token = [], None
    while True:
        page = client.search_experiments(max_results=PAGE, page_token=token)
        experiments += [e.experiment_id for e in page]
        token = page.token
        if not token:
            break
    found = client.search_runs(experiments, filter_string=f"tags.sweep_id = '{sweep_id}' AND tags.kind = 'sweep'",
                               max_results=1) if experiments else []
    return found[0] if found else None


def trial_runs(client, experiment_id: str, sweep_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=PAGE, page_token=token,
                                  filter_string=f"tags.sweep_id = '{sweep_id}' AND tags.kind = 'trial'")
        runs += list(page)
        token = page.token
        if not token:
            return runs


def close_open_runs(client, state: SweepState, status: Status, reason: str) -> int:
    """End the runs a driver that is gone left open (trials, then the parent) with ``status`` and
    ``reason``; the sweep's index no longer holds, so it is invalidated first. Returns how many trials."""
    from mlflow.entities import RunTag

    tracking.invalidate_index(client, state.parent_run_id)
    closed = 0
    for run in trial_runs(client, state.experiment_id, state.sweep_id):
        if run.info.status in ("RUNNING", "SCHEDULED"):
            client.log_batch(run.info.run_id, tags=[RunTag("status", status.value), RunTag("reason", reason)])
            client.set_terminated(run.info.run_id, tracking.MLFLOW_STATUS[status])
            closed += 1
    if client.get_run(state.parent_run_id).info.status == "RUNNING":
        client.set_terminated(state.parent_run_id, tracking.MLFLOW_STATUS[status])
    return closed


def attempt_of(run) -> int:
    """The run's attempt number; -1 if its tag is not a positive integer (resubmission refuses those)."""
    text = run.data.tags.get("attempt", "1")
    return int(text) if text.isdigit() and int(text) > 0 else -1


def _indexed_rows(client, parent) -> Optional[list[TrialRow]]:
    """The rows of a finished sweep from its ``trials.json``, if the parent's tag still vouches for it."""
    token = parent.data.tags.get(tracking.INDEX_TAG)
    if parent.info.status == "RUNNING" or not token:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            index = json.loads(Path(client.download_artifacts(parent.info.run_id, tracking.INDEX_FILE, tmp)).read_text())
        except Exception:  # missing or unreadable: read the runs instead
            return None
    if index.get("token") != token:
        return None
    return [TrialRow(**row) for row in index["trials"]]


def planned_without_run(client, parent_run_id: str, have: set[str]) -> list[tuple[str, str, Any]]:
    """The cells of the sweep's plan (``plan.json`` on its parent run) with no run yet: not
    started, or never started by a driver that died. (key, overrides, config) each."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(parent_run_id, tracking.PLAN_FILE, tmp)
        except Exception:  # a sweep from before plans were stored: its runs are all there is
            return []
        planned = json.loads(Path(path).read_text())["trials"]
    return [(c["trial_key"], c["overrides"], c["config"]) for c in planned if c["trial_key"] not in have]


def open_sweep(uri: str, sweep_id: str) -> tuple[Any, Any]:
    """(client, parent run) of ``sweep_id``; raises ConfigError if the store holds no such sweep."""
    tracking.check_sweep_id(sweep_id, "sweep")
    client = tracking.client(uri)
    parent = tracking.retrying(lambda: find_parent(client, sweep_id), 30, "find the sweep")
    if parent is None:
        raise ConfigError("sweep", sweep_id, f"a sweep id recorded in {uri} (see the sweep's summary line)",
                          problem="no such sweep")
    return client, parent


def runs_by_key(client, parent, sweep_id: str) -> dict[str, list]:
    """The sweep's trial runs by trial key (one per attempt)."""
    by_key: dict[str, list] = {}
    for run in trial_runs(client, parent.info.experiment_id, sweep_id):
        by_key.setdefault(run.data.tags.get("trial_key", run.info.run_id), []).append(run)
    return by_key


def load(uri: str, sweep_id: str, refresh: bool = False) -> SweepState:
    """Raises ConfigError if the store holds no sweep ``sweep_id``. A finished sweep is read from
    its index (one file) unless ``refresh``; a running one, or one without a valid index, from its runs."""
    client, parent = open_sweep(uri, sweep_id)
    rows = None if refresh else _indexed_rows(client, parent)
    if rows is not None:
        return SweepState(sweep_id, uri, parent.info.experiment_id, parent.info.run_id, parent.info.status,
                          dict(parent.data.tags), sorted(rows, key=lambda r: r.overrides))
    by_key = runs_by_key(client, parent, sweep_id)
    rows = [TrialRow(trial_key=key, overrides=overrides, status=Status.PENDING.value, attempts=0, latest_attempt=0,
                     reason="not started", run_id="", executions=0)
            for key, overrides, _ in planned_without_run(client, parent.info.run_id, set(by_key))]
    for key, runs in by_key.items():
        latest = max(runs, key=attempt_of)
        tags = latest.data.tags
        rows.append(TrialRow(trial_key=key, overrides=tags.get("overrides", ""), status=tags.get("status", "?"),
                             attempts=len(runs), latest_attempt=attempt_of(latest), reason=tags.get("reason", ""),
                             run_id=latest.info.run_id,
                             executions=int(tags.get("ray_executions", "0"))))
    rows.sort(key=lambda r: r.overrides)
    return SweepState(sweep_id, uri, parent.info.experiment_id, parent.info.run_id, parent.info.status,
                      dict(parent.data.tags), rows)


def print_table(state: SweepState, job: Optional[dict[str, Any]] = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(state.counts.items()))
    console.print(f"sweep {state.sweep_id}: {state.sweep_status.lower()}, {len(state.trials)} trials ({counts}); "
                  f"mlflow {state.tracking_uri}, run {state.parent_run_id}", highlight=False)
    if job:
        console.print(f"ray job {job['submission_id']}: {job['status']}", highlight=False)
    table = Table("trial key", "overrides", "status", "attempts", "reason", "run id")
    for t in state.trials:
        table.add_row(t.trial_key, t.overrides, t.status, str(t.attempts), t.reason[:80], t.run_id)
    console.print(table)
