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
    import ray
    from omegaconf import OmegaConf

    from orchestrator import sweep_state

    # Baselines first: the comparisons need them, and a capped sweep should not end without them.
    trials = sorted(_dedupe(trials), key=lambda t: not t.baseline)
    started_at = time.perf_counter()
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
        tags["trials"] = str(len(trials))
        tags["baseline"] = json.dumps(dict(settings.sweep.baseline))
        if settings.sweep.recipe is not None:  # what `orchestrator recipe` predicted, for the report
            tags["recipe"] = json.dumps(OmegaConf.to_container(settings.sweep.recipe, resolve=True))
        _say_missing_baselines(trials, dict(settings.sweep.baseline))
    measuring = any(pairing.measures(t.spec.config) for t in trials)
    tracker = tracking.SweepTracker(uri, settings.sweep.name, sweep_id, tags=tags, parent_id=reopen,
                                    prior_rows=prior_rows)
    summary = SweepSummary(sweep_id, uri, settings.sweep.name, tracker.parent_id)
    if reopen is None:
        holder = lease.claim_new(tracker.client, tracker.parent_id)
        tracker.write_plan([t.spec for t in trials], OmegaConf.to_container(settings, resolve=True))
    if settings.sweep.reuse:
        trials = _reuse_finished(tracker, trials, summary)

    we_started_ray, loop, interrupted = False, None, None
    try:
        we_started_ray = scheduler.init_ray(settings.cluster)
        interrupted = scheduler.defer_interrupt()  # after ray.init, which installs a SIGTERM handler of its own
        loop = scheduler.SweepLoop(settings, trials, tracker, summary.counts)
        cells = summary.total + len(trials)  # reused ones included
        loop.reject_unfit()
        next_cancel_check = time.monotonic() + CANCEL_POLL_S
        next_heartbeat = time.monotonic() + HEARTBEAT_S
        next_starts_check = last_update = time.monotonic()
        longest_gap = 0.0  # between two updates of the progress bar, since the last heartbeat
        with _progress() as progress:
            bar = progress.add_task(f"sweep {sweep_id}", total=cells, running=0, failed=0)
            while loop.open:
                if interrupted.is_set():
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
                progress.update(bar, completed=summary.total, running=loop.running(),
                                failed=summary.counts["FAILED"] + summary.counts["TIMEOUT"])
                longest_gap = max(longest_gap, time.monotonic() - last_update)
                last_update = time.monotonic()
        status = "FINISHED"
    except _Cancelled:
        status = "KILLED"
        loop.close_open(Status.CANCELLED, "cancelled: orchestrator cancel")
    except KeyboardInterrupt:
        status = "KILLED"
        if loop is not None:
            loop.close_open(Status.CANCELLED, "cancelled: the driver was interrupted")
        raise
    except BaseException as error:
        status = "FAILED"
        if loop is not None:
            loop.close_open(Status.FAILED, f"driver error: {type(error).__name__}: {error}")
        raise
    finally:
        if interrupted is not None:
            scheduler.restore_interrupt(interrupted)
        if loop is None:  # Ray never came up: no trial ran
            for t in trials:
                tracker.finish_trial(t.spec, TrialResult(t.spec.trial_key, Status.FAILED,
                                                         reason="driver error before any trial started"))
                summary.counts[Status.FAILED.value] += 1
        summary.elapsed_s = time.perf_counter() - started_at
        tracker.finish_sweep(status)
        if holder is not None:
            tracker.writer.submit("release the sweep's lease", lease.release, tracker.client, tracker.parent_id,
                                  holder)
        if we_started_ray:
            ray.shutdown()
        _flush(tracker, settings.tracking.flush_timeout_s, summary)
        if status == "FINISHED" and settings.sweep.report and measuring and not summary.unrecorded:
            _report(uri, sweep_id)
        if url := store.ui_url(uri, tracker.experiment_id):
            print(f"mlflow ui: {url}")
        print(summary.line(), flush=True)
        COMPLETED.append(summary)
    return summary


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
                    summary: SweepSummary) -> list[PlannedTrial]:
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


def _report(uri: str, sweep_id: str) -> None:
    """The comparison report on the parent run. The results are recorded by now: a report that
    fails or is interrupted loses none of them, and `orchestrator report` makes it again."""
    try:
        rows, names, recipe_lines = report.generate(uri, sweep_id)
        if len(rows) <= REPORT_TABLE_MAX_ROWS:
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
