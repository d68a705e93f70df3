"""A sweep's state, read back from MLflow: the parent run, and one row per trial key.

A sweep is read from its index (``trials.json`` on the parent run, vouched for by a tag),
which its driver rewrites every few seconds while the sweep runs and once more at its end.
`status` shows a running sweep's index as of when it was written, and says so when its
driver is gone (a killed driver leaves its last index). What acts on trials (resubmit,
resume, cancel's clean-up) reads a running or repaired sweep from its runs, as does
``--refresh``: found by their tags (``sweep_id``, ``kind``), a page of 1000 at a time. A
trial key may have several runs, one per attempt (resubmissions); its row shows the latest.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import Counter
import dataclasses
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from jobs.spec import Status
from orchestrator import store, tracking
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
class LiveIndex:
    """Where a running sweep's rows came from: its driver's index, written at ``written_at`` (unix s)."""
    written_at: float
    driver: Optional[str] = None  # where its driver still runs ("pid 12 on host h, ..."); None: it is gone

    def describe(self) -> str:
        when = datetime.fromtimestamp(self.written_at, timezone.utc).strftime("%H:%M:%S UTC")
        age = f"{when} ({max(0.0, time.time() - self.written_at):.0f} s ago)"
        if self.driver:
            return f"as of {age}; its driver: {self.driver}"
        return (f"STALE: its driver is gone; these rows are as of {age}, when it last wrote them, and trials may "
                f"have ended since (--refresh reads every run; `orchestrator resume` re-runs the unfinished)")


@dataclass
class SweepState:
    sweep_id: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_status: str  # MLflow status of the parent run: RUNNING while the driver works
    tags: dict[str, str]
    trials: list[TrialRow] = field(default_factory=list)
    live: Optional[LiveIndex] = None  # a running sweep read from its index

    @property
    def counts(self) -> Counter:
        return Counter(t.status for t in self.trials)

    def to_json(self) -> str:
        data = asdict(self)
        data["counts"] = dict(self.counts)
        data.pop("tags")
        if self.live is not None:
            data["live"]["stale"] = self.live.driver is None
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
            client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tracking.ending_tags(status, reason).items()])
            client.set_terminated(run.info.run_id, tracking.MLFLOW_STATUS[status])
            closed += 1
    if client.get_run(state.parent_run_id).info.status == "RUNNING":
        client.set_terminated(state.parent_run_id, tracking.MLFLOW_STATUS[status])
    return closed


def attempt_of(run) -> int:
    """The run's attempt number; -1 if its tag is not a positive integer (resubmission refuses those)."""
    text = run.data.tags.get("attempt", "1")
    return int(text) if text.isdigit() and int(text) > 0 else -1


def _count_tag(run, tag: str) -> int:
    text = run.data.tags.get(tag, "0")
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise ConfigError(f"{tag} tag of run {run.info.run_id}", text, "a count", problem="stored tag is malformed")
    return int(text)


def _indexed_rows(client, parent) -> Optional[tuple[list[TrialRow], float]]:
    """The rows of the sweep's ``trials.json`` and when it was written, if the parent's tag still vouches for it."""
    token = parent.data.tags.get(tracking.INDEX_TAG)
    if not token:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            index = json.loads(Path(client.download_artifacts(parent.info.run_id, tracking.INDEX_FILE, tmp)).read_text(),
                               parse_constant=refuse_json_constant)
        except Exception:  # missing or unreadable: read the runs instead
            return None
    if not isinstance(index, dict) or index.get("token") != token:
        return None
    # An index from before live indexes has no written_at: it is a finished sweep's, or not one to follow.
    rows, written_at = index.get("trials"), index.get("written_at", 0.0 if parent.info.status != "RUNNING" else None)
    fields = {f.name: f.type for f in dataclasses.fields(TrialRow)}
    # A cache of the runs: anything unlike what the driver writes, and the runs are read instead.
    if not isinstance(rows, list) or not all(
            isinstance(row, dict) and set(row) == set(fields) and all(
                isinstance(row[k], int if t == "int" else str) and not isinstance(row[k], bool) for k, t in fields.items())
            for row in rows):
        return None
    if not isinstance(written_at, (int, float)) or isinstance(written_at, bool) or not 0 <= written_at < 1e11:
        return None
    return [TrialRow(**row) for row in rows], float(written_at)


@dataclass(frozen=True)
class PlannedCell:
    trial_key: str
    overrides: str
    config: dict


@dataclass(frozen=True)
class StoredPlan:
    """``plan.json`` on a sweep's parent run: every cell, and the sweep's settings (tracking.STORED_SETTINGS)."""
    trials: list[PlannedCell]
    settings: dict[str, dict[str, Any]]


_TRIAL_KEY = re.compile(r"[0-9a-f]{16}")


def stored_plan(client, parent_run_id: str) -> Optional[StoredPlan]:
    """The sweep's plan, checked as untrusted input (ConfigError); None for a sweep from before plans."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(parent_run_id, tracking.PLAN_FILE, tmp)
        except Exception:  # a sweep from before plans were stored: its runs are all there is
            return None
        try:
            data = json.loads(Path(path).read_text(), parse_constant=refuse_json_constant)
        except (ValueError, UnicodeDecodeError) as error:
            raise ConfigError(f"plan.json of run {parent_run_id}", type(error).__name__, "the JSON this project "
                              "writes", problem="stored plan is not JSON") from None

    def bad(what: str, value: Any) -> ConfigError:
        return ConfigError(f"plan.json of run {parent_run_id}", str(value)[:80], "the plan this project writes",
                           problem=f"stored plan has {what}")

    if not isinstance(data, dict) or not set(data) <= {"trials", "settings"} or not isinstance(data.get("trials"), list):
        raise bad("unexpected contents", sorted(data) if isinstance(data, dict) else type(data).__name__)
    cells = []
    for cell in data["trials"]:
        if not isinstance(cell, dict) or set(cell) != {"trial_key", "overrides", "config"}:
            raise bad("a cell with unexpected contents", cell)
        if not isinstance(cell["trial_key"], str) or not _TRIAL_KEY.fullmatch(cell["trial_key"]):
            raise bad("a bad trial key", cell["trial_key"])
        if not isinstance(cell["overrides"], str) or not isinstance(cell["config"], dict):
            raise bad("a cell with unexpected contents", cell)
        cells.append(PlannedCell(cell["trial_key"], cell["overrides"], cell["config"]))
    settings = data.get("settings", {})
    if not isinstance(settings, dict) or any(not isinstance(v, dict) or section not in tracking.STORED_SETTINGS or
                                             not set(v) <= set(tracking.STORED_SETTINGS[section])
                                             for section, v in settings.items()):
        raise bad("settings this project does not store", settings)
    return StoredPlan(cells, settings)


def refuse_json_constant(name: str) -> None:
    """json.loads's parse_constant for stored files: NaN and Infinity are refused, as JSON does."""
    raise ValueError(f"{name} is not a number JSON allows")


def open_sweep(uri: str, sweep_id: str) -> tuple[Any, Any]:
    """(client, parent run) of ``sweep_id``; raises ConfigError if the store holds no such sweep."""
    tracking.check_sweep_id(sweep_id, "sweep")
    client = store.connect(uri)
    parent = find_parent(client, sweep_id)
    if parent is None:
        raise ConfigError("sweep", sweep_id, f"a sweep id recorded in {uri} (see the sweep's summary line)",
                          problem="no such sweep")
    return client, parent


def _planned_without_run(client, parent_run_id: str, have: set[str]) -> list[tuple[str, str]]:
    """(key, overrides) of the plan's cells with no run yet: not started, or never started by a
    driver that died."""
    planned = stored_plan(client, parent_run_id)
    return [(c.trial_key, c.overrides) for c in planned.trials if c.trial_key not in have] if planned else []


def runs_by_key(client, parent, sweep_id: str) -> dict[str, list]:
    """The sweep's trial runs by trial key (one per attempt)."""
    by_key: dict[str, list] = {}
    for run in trial_runs(client, parent.info.experiment_id, sweep_id):
        by_key.setdefault(run.data.tags.get("trial_key", run.info.run_id), []).append(run)
    return by_key


def load(uri: str, sweep_id: str, refresh: bool = False, live: bool = False) -> SweepState:
    """Raises ConfigError if the store holds no sweep ``sweep_id``. Read from its index (one file) unless
    ``refresh``; a running sweep's only with ``live`` (for `status`, which then asks whether its driver
    still runs); else from its runs."""
    client, parent = open_sweep(uri, sweep_id)
    running = parent.info.status == "RUNNING"
    indexed = None if refresh or (running and not live) else _indexed_rows(client, parent)
    if indexed is None and running and live and not refresh:
        # The driver uploads a new index before it moves the tag: read between the two, try once more.
        parent = client.get_run(parent.info.run_id)
        indexed = _indexed_rows(client, parent)
        running = parent.info.status == "RUNNING"
    if indexed is not None:
        rows, written_at = indexed
        state = SweepState(sweep_id, uri, parent.info.experiment_id, parent.info.run_id, parent.info.status,
                           dict(parent.data.tags), sorted(rows, key=lambda r: r.overrides))
        if running:
            state.live = LiveIndex(written_at)
        return state
    by_key = runs_by_key(client, parent, sweep_id)
    rows = [TrialRow(trial_key=key, overrides=overrides, status=Status.PENDING.value, attempts=0, latest_attempt=0,
                     reason="not started", run_id="", executions=0)
            for key, overrides in _planned_without_run(client, parent.info.run_id, set(by_key))]
    for key, runs in by_key.items():
        latest = max(runs, key=attempt_of)
        tags = latest.data.tags
        rows.append(TrialRow(trial_key=key, overrides=tags.get("overrides", ""), status=tags.get("status", "?"),
                             attempts=len(runs), latest_attempt=attempt_of(latest), reason=tags.get("reason", ""),
                             run_id=latest.info.run_id,
                             executions=_count_tag(latest, "ray_executions")))
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
    if state.live is not None:
        console.print(f"index {state.live.describe()}", highlight=False, style=None if state.live.driver else "bold")
    if job:
        console.print(f"ray job {job['submission_id']}: {job['status']}", highlight=False)
    table = Table("trial key", "overrides", "status", "attempts", "reason", "run id")
    for t in state.trials:
        table.add_row(t.trial_key, t.overrides, t.status, str(t.attempts), t.reason[:80], t.run_id)
    console.print(table)
