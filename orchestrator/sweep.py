"""A sweep's life in the driver: open its parent run, run its trials (orchestrator.scheduler),
record them (orchestrator.tracking), report, and end.

Baselines are submitted first; with ``cluster.max_concurrent_trials`` at most that many
trials are in flight. Ctrl-C, SIGTERM (``ray job stop``) and ``orchestrator cancel`` end the
open trials CANCELLED. Whatever happens to the driver, short of SIGKILL, no child run is
left RUNNING.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

from omegaconf import DictConfig

from jobs.spec import Status, TrialResult
from orchestrator import lease, pairing, remote, report, scheduler, store, tracking
from orchestrator.plan import PlannedTrial
from orchestrator.credentials import mask
from orchestrator.errors import ConfigError

CANCEL_POLL_S = 2.0
HEARTBEAT_S = 30.0
REPORT_TABLE_MAX_ROWS = 40  # larger sweeps: the table is in the report, not on the terminal
# Every sweep this process ran. Hydra's entry point returns nothing, so this is how `orchestrator
# run` learns the outcome of the sweep its launcher ran (exit_code).
COMPLETED: list["SweepSummary"] = []


@dataclass
class SweepSummary:
    sweep_id: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    counts: Counter = field(default_factory=Counter)
    elapsed_s: float = 0.0
    unrecorded: int = 0  # MLflow writes that never landed
    results: dict[str, TrialResult] = field(default_factory=dict)  # trial key -> how it ended (no artifacts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def exit_code(self) -> int:
        """0: every trial finished or was unsupported here, and every result was recorded; else 1."""
        return 1 if self.counts["FAILED"] or self.counts["TIMEOUT"] or self.counts["CANCELLED"] or self.unrecorded \
            else 0

    def line(self) -> str:
        c = self.counts
        return (f"sweep {self.sweep_id}: {self.total} trials, {c['FINISHED']} finished, {c['FAILED']} failed, "
                f"{c['UNSUPPORTED']} unsupported, {c['TIMEOUT']} timeout, {c['CANCELLED']} cancelled "
                f"in {self.elapsed_s:.1f} s (mlflow {self.tracking_uri}, experiment '{self.experiment}', "
                f"run {self.parent_run_id})")


def new_sweep_id() -> str:
    return f"swp-{secrets.token_hex(3)}"


def _dedupe(trials: list[PlannedTrial]) -> list[PlannedTrial]:
    seen: dict[str, PlannedTrial] = {}
    for t in trials:
        if t.spec.trial_key in seen:
            print(f"note: {' '.join(t.spec.overrides)} is the same cell as "
                  f"{' '.join(seen[t.spec.trial_key].spec.overrides)}; running it once", file=sys.stderr)
        else:
            seen[t.spec.trial_key] = t
    return list(seen.values())


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("running {task.fields[running]} · failed {task.fields[failed]}"),
                    TimeElapsedColumn(), console=Console(stderr=True))


class _Cancelled(Exception):
    """`orchestrator cancel` asked the sweep to stop."""


def execute(settings: DictConfig, trials: list[PlannedTrial], reopen: Optional[str] = None,
            prior_rows: Sequence[dict] = (), holder: Optional[lease.Holder] = None) -> SweepSummary:
    """Run ``trials`` as one sweep; prints and returns its summary. ``reopen``: the parent run
    of an earlier sweep (``settings.sweep.id``) that these trials are new attempts of, ``prior_rows``
    that sweep's trial rows before them, and ``holder`` the lease on it this process took."""
    sweep = Sweep(settings, reopen=reopen, prior_rows=prior_rows, holder=holder,
                  cells=len({t.spec.trial_key for t in trials}))
    try:
        sweep.run(trials)
    finally:
        sweep.end()
    return sweep.summary


class Sweep:
    """One sweep's life in the driver: opened (its parent run and lease), one batch of trials run per
    :meth:`run` (a grid sweep has one; an adaptive study, orchestrator.study, one per step), then
    :meth:`end` (the counts, the lease released, the report, the summary line).

    With ``study``, a batch holds only the cells the sweep has not ended yet: a key that ended in this
    process is not run again, and one that an earlier driver of the sweep recorded (``prior_rows``) is
    taken from its run if it FINISHED or was UNSUPPORTED, else run as its next attempt."""

    def __init__(self, settings: DictConfig, reopen: Optional[str] = None, prior_rows: Sequence[dict] = (),
                 holder: Optional[lease.Holder] = None, prior_plan: Sequence[dict] = (), study: bool = False,
                 cells: Optional[int] = None):
        """``cells``: how many trials a new sweep will have (its ``trials`` tag), where known."""
        from omegaconf import OmegaConf

        from orchestrator import sweep_state

        self.started_at = time.perf_counter()
        self.settings, self.reopen, self.study, self.holder = settings, reopen, study, holder
        uri = store.resolve_uri(settings.tracking.uri)
        mlflow_client = store.connect(uri)  # a dead or wrong store: one line, before anything is made
        sweep_id = settings.sweep.id or new_sweep_id()
        if reopen is None and settings.sweep.id and sweep_state.find_parent(mlflow_client, sweep_id) is not None:
            raise ConfigError("sweep.id", sweep_id, f"a new id; more attempts of that sweep: orchestrator resubmit "
                                                    f"{sweep_id} --failed, or orchestrator resume {sweep_id}",
                              problem="a sweep with this id exists")
        tags = {"command": mask(" ".join(sys.argv)), **remote.job_tags(), "driver_host": socket.gethostname(),
                "driver_pid": str(os.getpid())}
        if reopen is None:  # a resubmission keeps the sweep's own baseline
            if cells is not None:
                tags["trials"] = str(cells)
            tags["baseline"] = json.dumps(dict(settings.sweep.baseline))
            if settings.sweep.recipe is not None:  # what `orchestrator recipe` predicted, for the report
                tags["recipe"] = json.dumps(OmegaConf.to_container(settings.sweep.recipe, resolve=True))
        self.tracker = tracking.SweepTracker(uri, settings.sweep.name, sweep_id, tags=tags, parent_id=reopen,
                                             prior_rows=prior_rows, prior_plan=prior_plan)
        self.summary = SweepSummary(sweep_id, uri, settings.sweep.name, self.tracker.parent_id)
        if reopen is None:
            self.holder = lease.claim_new(self.tracker.client, self.tracker.parent_id)
        self.prior = {row["trial_key"]: row for row in prior_rows}
        self.status, self.cancelled, self.measuring, self.batches = "FINISHED", False, False, 0
        self.results: dict[str, TrialResult] = {}  # keys ended in this process, and ones taken from earlier drivers
        self.we_started_ray, self.loop, self.interrupted = False, None, None

    def run(self, trials: list[PlannedTrial]) -> dict[str, TrialResult]:
        """Run a batch to its end; each of its keys' results (status, reason, metrics). Ctrl-C and SIGTERM
        end its open trials CANCELLED and raise KeyboardInterrupt; `orchestrator cancel` ends them
        CANCELLED and sets ``cancelled``; a driver error ends them FAILED and is raised."""
        from omegaconf import OmegaConf

        # Baselines first: the comparisons need them, and a capped sweep should not end without them.
        trials = sorted(_dedupe(trials), key=lambda t: not t.baseline)
        keys = [t.spec.trial_key for t in trials]
        if self.study:
            trials = self._not_ended(trials)
        first, self.batches = self.batches == 0, self.batches + 1
        if first and self.reopen is None:
            _say_missing_baselines(trials, dict(self.settings.sweep.baseline))
        self.measuring = self.measuring or any(pairing.measures(t.spec.config) for t in trials)
        if self.reopen is None or self.study:
            self.tracker.write_plan([t.spec for t in trials], OmegaConf.to_container(self.settings, resolve=True))
        if self.settings.sweep.reuse:
            trials = _reuse_finished(self.tracker, trials, self.summary, self.results)
        if not trials:
            return {k: self.results[k] for k in keys}
        try:
            if self.loop is None:
                self.we_started_ray = scheduler.init_ray(self.settings.cluster)
                self.interrupted = scheduler.defer_interrupt()  # after ray.init, which installs a SIGTERM handler
                self.loop = scheduler.SweepLoop(self.settings, self.tracker, self.summary.counts, self.results)
            self._loop(trials)
        except _Cancelled:
            self.status, self.cancelled = "KILLED", True
            self.loop.close_open(Status.CANCELLED, "cancelled: orchestrator cancel")
        except KeyboardInterrupt:
            self.status = "KILLED"
            self._close_batch(trials, Status.CANCELLED, "cancelled: the driver was interrupted")
            raise
        except BaseException as error:
            self.status = "FAILED"
            self._close_batch(trials, Status.FAILED, f"driver error: {type(error).__name__}: {error}")
            raise
        return {k: self.results[k] for k in keys}

    def _close_batch(self, trials: list[PlannedTrial], status: Status, reason: str) -> None:
        if self.loop is not None:
            self.loop.close_open(status, reason)
            return
        for t in trials:  # Ray never came up: no trial of this batch ran
            self.tracker.finish_trial(t.spec, TrialResult(t.spec.trial_key, status, reason=reason[:500]))
            self.summary.counts[status.value] += 1

    def _loop(self, trials: list[PlannedTrial]) -> None:
        loop, tracker, summary = self.loop, self.tracker, self.summary
        loop.add(trials)
        loop.reject_unfit()
        next_cancel_check = time.monotonic() + CANCEL_POLL_S
        next_heartbeat = time.monotonic() + HEARTBEAT_S
        next_starts_check = last_update = time.monotonic()
        longest_gap = 0.0  # between two updates of the progress bar, since the last heartbeat
        with _progress() as progress:
            step = f" step {self.batches}" if self.study else ""
            done = summary.total
            bar = progress.add_task(f"sweep {summary.sweep_id}{step}", total=len(trials), running=0, failed=0)
            while loop.open:
                if self.interrupted.is_set():
                    raise KeyboardInterrupt
                if time.monotonic() > next_heartbeat:
                    next_heartbeat = time.monotonic() + HEARTBEAT_S
                    tracker.heartbeat(len(loop.in_flight), longest_gap)
                    longest_gap = 0.0
                if time.monotonic() > next_cancel_check:
                    next_cancel_check = time.monotonic() + CANCEL_POLL_S
                    if _cancel_requested(tracker):
                        raise _Cancelled
                loop.submit_ready()
                ready = loop.wait_ready()
                if time.monotonic() > next_starts_check:
                    next_starts_check = time.monotonic() + scheduler.STARTS_POLL_S
                    loop.note_starts()
                loop.end_timed_out()
                loop.collect(ready)
                tracker.update_index()
                progress.update(bar, completed=summary.total - done, running=loop.running(),
                                failed=summary.counts["FAILED"] + summary.counts["TIMEOUT"])
                longest_gap = max(longest_gap, time.monotonic() - last_update)
                last_update = time.monotonic()

    def _not_ended(self, trials: list[PlannedTrial]) -> list[PlannedTrial]:
        """A study's batch less the keys the sweep has ended (their results kept); a key an earlier driver
        left unfinished becomes its next attempt."""
        import dataclasses

        taken = {Status.FINISHED.value, Status.UNSUPPORTED.value}
        out = []
        for t in trials:
            key = t.spec.trial_key
            row = self.prior.get(key)
            if key in self.results:
                continue
            if row is not None and row["status"] in taken and row["run_id"]:
                self.results[key] = _recorded_result(self.tracker.client, row)
            elif row is not None:
                attempt = max(row["attempts"], row["latest_attempt"]) + 1
                out.append(dataclasses.replace(t, spec=dataclasses.replace(t.spec, attempt=attempt)))
            else:
                out.append(t)
        return out

    def end(self) -> SweepSummary:
        """End the sweep (whatever ``run`` raised): its counts, its lease, the report, the summary line."""
        import ray

        if self.interrupted is not None:
            scheduler.restore_interrupt(self.interrupted)
        tracker, summary = self.tracker, self.summary
        summary.elapsed_s, summary.results = time.perf_counter() - self.started_at, self.results
        tracker.finish_sweep(self.status)
        if self.holder is not None:
            tracker.writer.submit("release the sweep's lease", lease.release, tracker.client, tracker.parent_id,
                                  self.holder)
        if self.we_started_ray:
            ray.shutdown()
        _flush(tracker, self.settings.tracking.flush_timeout_s, summary)
        if self.status == "FINISHED" and self.settings.sweep.report and (self.measuring or self.study) \
                and not summary.unrecorded:
            _report(summary.tracking_uri, summary.sweep_id, self.measuring)
        if url := store.ui_url(summary.tracking_uri, tracker.experiment_id):
            print(f"mlflow ui: {url}")
        print(summary.line(), flush=True)
        COMPLETED.append(summary)
        return summary


def _recorded_result(mlflow_client, row: dict) -> TrialResult:
    """An ended trial as its run holds it (an earlier driver of the sweep recorded it)."""
    metrics = store.retrying(lambda: mlflow_client.get_run(row["run_id"]).data.metrics, tracking.START_DEADLINE_S,
                             "read a trial's run")
    return TrialResult(row["trial_key"], Status(row["status"]), metrics=dict(metrics), reason=row["reason"] or None)


def _paired_files(client, run_id: str) -> dict[str, str]:
    """A reused run's per-window and per-example files, which this sweep's report pairs (and checks
    as it checks every stored file); one that is missing or refused is left out."""
    files = {}
    for name in pairing.PAIRED_FILES:
        try:
            text = store.download_text(client, run_id, name, pairing.MAX_FILE_BYTES)
        except ValueError:
            continue
        if text is not None:
            files[name] = text
    return files


def _reuse_finished(tracker: tracking.SweepTracker, trials: list[PlannedTrial],
                    summary: SweepSummary, results: dict[str, TrialResult]) -> list[PlannedTrial]:
    """sweep.reuse=true: cells an earlier sweep finished are recorded from it, not re-run; the rest remain."""
    done = tracker.finished_elsewhere({t.spec.trial_key for t in trials})
    for t in trials:
        if t.spec.trial_key in done:
            source = done[t.spec.trial_key]
            # Its metrics and environment, tagged with where they came from. Not its comparison, which was
            # against the other sweep's baseline: this sweep's report makes its own.
            env = {k: v for k, v in source.data.tags.items() if not k.startswith("mlflow.")
                   and k not in tracking.RUN_LAYOUT_TAGS and k not in pairing.COMPARISON_TAGS}
            metrics = {k: v for k, v in source.data.metrics.items() if not pairing.is_comparison_metric(k)}
            artifacts = _paired_files(tracker.client, source.info.run_id)
            results[t.spec.trial_key] = TrialResult(t.spec.trial_key, Status.FINISHED, metrics=metrics)
            tracker.finish_trial(t.spec, TrialResult(t.spec.trial_key, Status.FINISHED, metrics=metrics, env=env,
                                                     artifacts=artifacts),
                                 {"reused_from": source.info.run_id,
                                  "reused_from_sweep": source.data.tags.get("sweep_id", "")})
            summary.counts[Status.FINISHED.value] += 1
            print(f"reused: {' '.join(t.spec.overrides) or t.spec.trial_key} from run {source.info.run_id} "
                  f"of sweep {source.data.tags.get('sweep_id')}", file=sys.stderr)
    if done:
        print(f"sweep.reuse=true: {len(done)} of {len(trials)} trials taken from earlier sweeps, "
              f"{len(trials) - len(done)} to run", file=sys.stderr)
    return [t for t in trials if t.spec.trial_key not in done]


def _say_missing_baselines(trials: list[PlannedTrial], baseline: dict[str, str]) -> None:
    measuring = [t for t in trials if pairing.measures(t.spec.config)]
    missing = pairing.missing_baselines([t.spec.config for t in measuring], baseline)
    if missing:
        example = " ".join(measuring[missing[0]].spec.overrides)
        print(f"no baseline: {len(missing)} of {len(measuring)} trials have no {pairing.describe(baseline)} cell with "
              f"the same model, bench, eval, seed and device in this sweep (e.g. {example or 'the defaults'}); "
              f"they get no speedups or deltas. Add the baseline's choices to the sweep, or set sweep.baseline.",
              file=sys.stderr)


def _report(uri: str, sweep_id: str, measuring: bool = True) -> None:
    """The comparison report on the parent run. The results are recorded by now: a report that
    fails or is interrupted loses none of them, and `orchestrator report` makes it again."""
    try:
        rows, names, recipe_lines = report.generate(uri, sweep_id)
        if measuring and len(rows) <= REPORT_TABLE_MAX_ROWS:  # no-op trials have nothing to compare
            report.print_table(rows, sweep_id, recipe_lines)
        print(f"report: {', '.join(names)} under report/ on the sweep's run", flush=True)
    except (Exception, KeyboardInterrupt) as error:
        print(f"report: not made ({type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}); "
              f"`orchestrator report {sweep_id}` makes it", file=sys.stderr)


def _cancel_requested(tracker: tracking.SweepTracker) -> bool:
    try:
        return tracker.cancel_requested()
    except Exception:  # store unreachable for now: ask again later
        return False


def _flush(tracker: tracking.SweepTracker, timeout_s: float, summary: SweepSummary) -> None:
    """Wait for the results to land in MLflow; say so if the store is slow or out of reach."""
    writer = tracker.writer
    if not writer.flush(1.0):
        print(f"waiting for {writer.pending} MLflow writes to {tracker.uri} (up to {timeout_s:g} s)",
              file=sys.stderr, flush=True)
        writer.flush(timeout_s)
    summary.unrecorded = writer.pending + len(writer.errors)
    for error in writer.errors:
        print(f"mlflow: not recorded: {error}", file=sys.stderr)
    if writer.pending:
        print(f"mlflow: {writer.pending} writes to {tracker.uri} still pending after {timeout_s:g} s; "
              f"the sweep's runs there are incomplete", file=sys.stderr)
