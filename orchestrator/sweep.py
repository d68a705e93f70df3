"""Run planned trials on Ray and record them in MLflow: the driver's side of a sweep.

Every trial is one Ray task in a fresh worker process (``max_calls=1``: its memory is
its own and freed after), with the CPUs/GPUs its config asks for. Ray retries a task
whose worker or node dies; a trial's own errors come back as FAILED results and are
not retried. Whatever happens to the driver, no child run is left RUNNING.
"""

from __future__ import annotations

import secrets
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

from omegaconf import DictConfig

from jobs.spec import Status, TrialResult, TrialSpec
from orchestrator import tracking

POLL_S = 0.5
COMPLETED: list["SweepSummary"] = []  # every sweep this process ran, for the CLI's exit code


@dataclass(frozen=True)
class PlannedTrial:
    spec: TrialSpec
    resources: dict[str, float]


@dataclass
class SweepSummary:
    sweep_id: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    counts: Counter = field(default_factory=Counter)
    elapsed_s: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        c = self.counts
        return (f"sweep {self.sweep_id}: {self.total} trials, {c['FINISHED']} finished, {c['FAILED']} failed, "
                f"{c['UNSUPPORTED']} unsupported, {c['TIMEOUT']} timeout, {c['CANCELLED']} cancelled "
                f"in {self.elapsed_s:.1f} s (mlflow {self.tracking_uri}, experiment '{self.experiment}', "
                f"run {self.parent_run_id})")


def new_sweep_id() -> str:
    return f"swp-{secrets.token_hex(3)}"


def _run_trial(spec: TrialSpec, board) -> TrialResult:
    """The Ray task: tell the driver it started, then run the trial (no Ray inside)."""
    import ray

    from jobs import trial

    board.start.remote(spec.trial_key, ray.get_runtime_context().get_node_id())
    return trial.run(spec)


class _Board:
    """Collects 'trial started' notes from workers; the driver drains them."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []

    def start(self, key: str, node: str) -> None:
        self.started.append((key, node))

    def drain(self) -> list[tuple[str, str]]:
        started, self.started = self.started, []
        return started


def _dedupe(trials: list[PlannedTrial]) -> list[PlannedTrial]:
    seen: dict[str, PlannedTrial] = {}
    for t in trials:
        if t.spec.trial_key in seen:
            print(f"note: {' '.join(t.spec.overrides)} is the same cell as "
                  f"{' '.join(seen[t.spec.trial_key].spec.overrides)}; running it once", file=sys.stderr)
        else:
            seen[t.spec.trial_key] = t
    return list(seen.values())


def _init_ray(cluster: DictConfig) -> bool:
    """Connect to cluster.address or start an embedded Ray; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = {"num_cpus": cluster.num_cpus} if cluster.address is None else {}
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", **kwargs)
    return True


def _ray_failure(spec: TrialSpec, error: Exception) -> TrialResult:
    """A trial whose task died (worker/node lost, killed for memory) rather than returned."""
    import ray

    kind = "out of memory" if isinstance(error, ray.exceptions.OutOfMemoryError) else type(error).__name__
    first_line = (str(error).strip().splitlines() or [""])[0]
    return TrialResult(trial_key=spec.trial_key, status=Status.FAILED, reason=f"{kind}: {first_line}"[:500],
                       artifacts={"traceback.txt": str(error)})


class _Interrupt(threading.Event):
    previous_handler: object = signal.default_int_handler


def _defer_interrupt() -> _Interrupt:
    """Turn the first Ctrl-C into a flag the sweep loop checks between MLflow writes, so an
    interrupt never lands inside one; a second Ctrl-C interrupts at once."""
    flag = _Interrupt()
    if threading.current_thread() is threading.main_thread():
        flag.previous_handler = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            flag.set()
            signal.signal(signal.SIGINT, flag.previous_handler)

        signal.signal(signal.SIGINT, on_sigint)
    return flag


def _restore_interrupt(flag: _Interrupt) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, flag.previous_handler)


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("running {task.fields[running]} · failed {task.fields[failed]}"),
                    TimeElapsedColumn(), console=Console(stderr=True))


def execute(settings: DictConfig, trials: list[PlannedTrial]) -> SweepSummary:
    """Run ``trials`` as one sweep; prints and returns its summary."""
    import ray

    trials = _dedupe(trials)
    started_at = time.perf_counter()
    uri = tracking.resolve_uri(settings.tracking.uri)
    sweep_id = new_sweep_id()
    tracker = tracking.SweepTracker(uri, settings.sweep.name, sweep_id,
                                    tags={"command": " ".join(sys.argv), "trials": str(len(trials))})
    summary = SweepSummary(sweep_id, uri, settings.sweep.name, tracker.parent_id)
    open_runs: dict[str, str] = {}  # trial key -> run id, until the run is terminated
    specs = {t.spec.trial_key: t.spec for t in trials}

    def record(key: str, result: TrialResult) -> None:
        tracker.finish_trial(open_runs.pop(key), specs[key], result)
        summary.counts[result.status.value] += 1

    we_started_ray = False
    pending: dict = {}
    interrupted = _defer_interrupt()
    try:
        for t in trials:
            open_runs[t.spec.trial_key] = tracker.add_trial(t.spec)
        we_started_ray = _init_ray(settings.cluster)
        board = ray.remote(num_cpus=0)(_Board).remote()
        remote_trial = ray.remote(max_calls=1)(_run_trial)
        pending = {remote_trial.options(name=f"trial-{key}", **t.resources)
                   .remote(t.spec, board): key for t in trials for key in [t.spec.trial_key]}
        running: set[str] = set()
        with _progress() as progress:
            bar = progress.add_task(f"sweep {sweep_id}", total=len(trials), running=0, failed=0)
            while pending:
                if interrupted.is_set():
                    raise KeyboardInterrupt
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                for key, node in ray.get(board.drain.remote()):
                    if key in open_runs and key not in running:
                        running.add(key)
                        tracker.mark_running(open_runs[key], node)
                for ref in ready:
                    key = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as error:
                        result = _ray_failure(specs[key], error)
                    running.discard(key)
                    record(key, result)
                progress.update(bar, completed=summary.total, running=len(running),
                                failed=summary.counts["FAILED"] + summary.counts["TIMEOUT"])
        status = "FINISHED"
    except KeyboardInterrupt:
        status, reason, final = "KILLED", "cancelled: the driver was interrupted", Status.CANCELLED
        raise
    except BaseException as error:
        status, reason, final = "FAILED", f"driver error: {type(error).__name__}: {error}", Status.FAILED
        raise
    finally:
        _restore_interrupt(interrupted)
        if status != "FINISHED":
            for ref in pending:
                ray.cancel(ref, force=True)
            for key in list(open_runs):
                record(key, TrialResult(trial_key=key, status=final, reason=reason[:500],
                                        artifacts={"traceback.txt": traceback.format_exc()}))
        summary.elapsed_s = time.perf_counter() - started_at
        tracker.finish_sweep(dict(summary.counts), status)
        if we_started_ray:
            ray.shutdown()
        print(summary.line(), flush=True)
        COMPLETED.append(summary)
    return summary
