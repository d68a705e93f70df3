"""Run planned trials on Ray and record them in MLflow: the driver's side of a sweep.

Every trial is one Ray task with the CPUs, GPUs, memory and accelerator type its config
asks for (one task: its GPUs are on one node), by default in a fresh worker process
(``max_calls=1``: its memory is freed when it ends). Baselines are submitted first; with
``cluster.max_concurrent_trials`` at most that many trials are in flight.

Faults: Ray re-runs a task whose worker or node died (``cluster.max_retries``), so a
retried trial stays one MLflow run that counts its executions; a trial's own errors come
back as FAILED results and are not retried. A trial past ``resources.timeout_s`` is
TIMEOUT and its worker is killed, freeing its GPU. Ctrl-C, SIGTERM (``ray job stop``) and
``orchestrator cancel`` end the open trials CANCELLED. Whatever happens to the driver,
short of SIGKILL, no child run is left RUNNING.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from omegaconf import DictConfig

from jobs.spec import Status, TrialResult, TrialSpec
from orchestrator import lease, remote, report, tracking
from orchestrator.plan import PlannedTrial
from orchestrator.credentials import mask
from orchestrator.errors import ConfigError

POLL_S = 0.5
STARTS_POLL_S = 0.25  # how often the driver reads which trials started (a round trip to the board actor)
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


def _run_trial(spec: TrialSpec, board, system_metrics_interval_s: Optional[float]) -> TrialResult:
    """The Ray task: tell the driver it started, then run the trial (no Ray inside)."""
    import ray

    import jobs

    node = ray.get_runtime_context().get_node_id()
    board.start.remote(spec.trial_key, node)
    if system_metrics_interval_s is None:
        result = jobs.run_trial(spec)
    else:
        from orchestrator.system_metrics import Sampler

        with Sampler(system_metrics_interval_s) as sampler:
            result = jobs.run_trial(spec)
        result.series.update(sampler.series)
    result.env["ray_node"] = node  # the start note may reach the driver after a fast trial's result
    return result


class _Board:
    """Collects 'trial started' notes from workers (one per execution); the driver drains them."""

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
    # address "local": always a new embedded Ray, never a cluster that `ray start` left behind.
    kwargs = {"num_cpus": cluster.num_cpus} if cluster.address is None else {}
    ray.init(address=cluster.address or "local", include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", **kwargs)
    return True


def _demand(options: dict[str, Any]) -> dict[str, float]:
    """Ray resource names and amounts a task with these options needs on one node."""
    need = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], "memory": options.get("memory", 0)}
    if options.get("accelerator_type"):
        need[f"accelerator_type:{options['accelerator_type']}"] = 0.001
    return {name: amount for name, amount in need.items() if amount}


def _describe(resources: dict[str, float]) -> str:
    parts = [f"{resources.get('CPU', 0):g} CPU", f"{resources.get('GPU', 0):g} GPU"]
    if resources.get("memory"):
        parts.append(f"{resources['memory'] / 2 ** 30:.1f} GiB memory")
    parts += [name for name in sorted(resources) if name.startswith("accelerator_type:")]
    return ", ".join(parts)


def unfit_reason(options: dict[str, Any], nodes: list[dict[str, float]]) -> Optional[str]:
    """Why no node of the cluster could ever run a task with these options (None if one could)."""
    need = _demand(options)
    if any(all(node.get(name, 0) >= amount for name, amount in need.items()) for node in nodes):
        return None
    offers = "; ".join(sorted({_describe(node) for node in nodes})) or "no nodes"
    return (f"no node of the cluster can hold this trial: it asks {_describe(need)}; the nodes offer: {offers} "
            f"(with an autoscaler that adds such nodes, set cluster.autoscaling=true)")


def _ray_failure(spec: TrialSpec, error: Exception) -> TrialResult:
    """A trial whose task died (worker/node lost, killed for memory) rather than returned."""
    import ray

    kind = "out of memory" if isinstance(error, ray.exceptions.OutOfMemoryError) else type(error).__name__
    first_line = (str(error).strip().splitlines() or [""])[0]
    return TrialResult(trial_key=spec.trial_key, status=Status.FAILED, reason=f"{kind}: {first_line}"[:500],
                       artifacts={"traceback.txt": str(error)})


class _Interrupt(threading.Event):
    previous: dict = {}


def _defer_interrupt() -> _Interrupt:
    """Turn the first Ctrl-C or SIGTERM into a flag the sweep loop checks, so an interrupt
    never lands inside a bookkeeping step; a second Ctrl-C interrupts at once."""
    flag = _Interrupt()
    flag.previous = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, frame):
            flag.set()
            signal.signal(signal.SIGINT, flag.previous[signal.SIGINT])

        for sig in (signal.SIGINT, signal.SIGTERM):
            flag.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, on_signal)
    return flag


def _restore_interrupt(flag: _Interrupt) -> None:
    for sig, handler in flag.previous.items():
        signal.signal(sig, handler)


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("running {task.fields[running]} · failed {task.fields[failed]}"),
                    TimeElapsedColumn(), console=Console(stderr=True))


class _Cancelled(Exception):
    """`orchestrator cancel` asked the sweep to stop."""


class _SweepLoop:
    """The state of one sweep while it runs: what is queued, in flight, running, done."""

    def __init__(self, settings: DictConfig, trials: list[PlannedTrial], tracker: tracking.SweepTracker,
                 summary: SweepSummary):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.settings, self.tracker, self.summary = settings, tracker, summary
        self.trials = {t.spec.trial_key: t for t in trials}
        self.queue = deque(t.spec.trial_key for t in trials)
        self.open: set[str] = set(self.trials)      # keys whose run is not terminated yet
        self.in_flight: dict[Any, str] = {}         # object ref -> key
        self.started_at: dict[str, float] = {}      # key -> when its current execution started
        self.executions: Counter = Counter()        # key -> executions seen (Ray re-runs a lost one)
        self.nodes: dict[str, list[str]] = {}
        # The board lives on the head node, which lives as long as the cluster; restarted if lost all the same
        # (it only holds start notes not yet drained).
        head = next((n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]),
                    ray.get_runtime_context().get_node_id())
        self.board = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_Board).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=True)).remote()
        self.draining = None  # the board's answer to the last drain call, until it is taken
        cluster = settings.cluster
        self.remote_trial = ray.remote(max_calls=1 if cluster.fresh_worker_per_trial else 0,
                                       max_retries=cluster.max_retries, retry_exceptions=False)(_run_trial)

    def record(self, key: str, result: TrialResult) -> None:
        nodes = self.nodes.get(key, [])
        last = result.env.pop("ray_node", None)
        if last and (not nodes or nodes[-1] != last):
            nodes.append(last)
        tags = {"ray_executions": str(max(self.executions[key], len(nodes)))}
        if nodes:
            tags["ray_nodes"] = ",".join(nodes)
        self.tracker.finish_trial(self.trials[key].spec, result, tags)
        self.open.discard(key)
        self.started_at.pop(key, None)
        self.summary.counts[result.status.value] += 1

    def reject_unfit(self) -> None:
        """Trials no node could ever hold are UNSUPPORTED now, not left pending forever."""
        import ray

        if self.settings.cluster.autoscaling:
            return
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        for key in list(self.queue):
            reason = unfit_reason(self.trials[key].ray_options, nodes)
            if reason:
                self.queue.remove(key)
                self.record(key, TrialResult(trial_key=key, status=Status.UNSUPPORTED, reason=reason))

    def submit_ready(self) -> None:
        cap = self.settings.cluster.max_concurrent_trials or len(self.trials)
        while self.queue and len(self.in_flight) < cap:
            key = self.queue.popleft()
            trial = self.trials[key]
            ref = self.remote_trial.options(name=f"trial-{key}", **trial.ray_options).remote(
                trial.spec, self.board, self.settings.tracking.system_metrics_interval_s)
            self.in_flight[ref] = key

    def wait_ready(self) -> list:
        """The trials that have ended: waits up to POLL_S for one, then takes all others already done."""
        import ray

        if not self.in_flight:
            return []
        refs = list(self.in_flight)
        ready, rest = ray.wait(refs, num_returns=1, timeout=POLL_S)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        return ready

    def note_starts(self) -> None:
        """Take the start notes the board has, without waiting for it (it may still be starting)."""
        import ray

        if self.draining is None:
            self.draining = self.board.drain.remote()
        if not ray.wait([self.draining], timeout=0)[0]:
            return
        started = ray.get(self.draining)
        self.draining = self.board.drain.remote()  # calls to one actor run in order: no note is lost
        for key, node in started:
            if key not in self.open:
                continue
            self.executions[key] += 1
            self.nodes.setdefault(key, []).append(node)
            self.started_at[key] = time.monotonic()
            self.tracker.mark_running(self.trials[key].spec, node, self.executions[key])

    def end_timed_out(self) -> None:
        import ray

        now = time.monotonic()
        for ref, key in list(self.in_flight.items()):
            limit = self.trials[key].timeout_s
            if limit is not None and key in self.started_at and now - self.started_at[key] > limit:
                ray.cancel(ref, force=True)  # kills the worker: its GPU and memory are freed
                del self.in_flight[ref]
                self.record(key, TrialResult(trial_key=key, status=Status.TIMEOUT, duration_s=now - self.started_at[key],
                                             reason=f"timeout: still running after resources.timeout_s={limit:g} s; "
                                                    f"its worker was killed"))

    def collect(self, ready: list) -> None:
        import ray

        for ref in ready:
            key = self.in_flight.pop(ref, None)
            if key is None:
                continue
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as error:
                result = _ray_failure(self.trials[key].spec, error)
            self.record(key, result)

    def running(self) -> int:
        return sum(1 for key in self.in_flight.values() if key in self.started_at)

    def close_open(self, status: Status, reason: str) -> None:
        import ray

        for ref in self.in_flight:
            ray.cancel(ref, force=True)
        details = traceback.format_exc() if sys.exc_info()[0] else reason
        for key in sorted(self.open):
            self.record(key, TrialResult(trial_key=key, status=status, reason=reason[:500],
                                         artifacts={"traceback.txt": details}))


def execute(settings: DictConfig, trials: list[PlannedTrial], reopen: Optional[str] = None,
            prior_rows: Sequence[dict] = (), holder: Optional[lease.Holder] = None) -> SweepSummary:
    """Run ``trials`` as one sweep; prints and returns its summary. ``reopen``: the parent run
    of an earlier sweep (``settings.sweep.id``) that these trials are new attempts of, ``prior_rows``
    that sweep's trial rows before them, and ``holder`` the lease on it this process took."""
    import ray
    from omegaconf import OmegaConf

    from orchestrator import status as sweep_status

    # Baselines first: the comparisons need them, and a capped sweep should not end without them.
    trials = sorted(_dedupe(trials), key=lambda t: not t.baseline)
    started_at = time.perf_counter()
    uri = tracking.resolve_uri(settings.tracking.uri)
    store = tracking.connect(uri)  # a dead or wrong store: one line, before anything is made
    sweep_id = settings.sweep.id or new_sweep_id()
    if reopen is None and settings.sweep.id and sweep_status.find_parent(store, sweep_id) is not None:
        raise ConfigError("sweep.id", sweep_id, f"a new id; more attempts of that sweep: orchestrator resubmit "
                                                f"{sweep_id} --failed, or orchestrator resume {sweep_id}",
                          problem="a sweep with this id exists")
    tags = {"command": mask(" ".join(sys.argv)), **remote.job_tags(), "driver_host": socket.gethostname(),
            "driver_pid": str(os.getpid())}
    if reopen is None:  # a resubmission keeps the sweep's own baseline
        tags["trials"] = str(len(trials))
        tags["baseline"] = json.dumps(dict(settings.sweep.baseline))
        _say_missing_baselines(trials, dict(settings.sweep.baseline))
    measuring = any(report.measures(t.spec.config) for t in trials)
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
        we_started_ray = _init_ray(settings.cluster)
        interrupted = _defer_interrupt()  # after ray.init, which installs a SIGTERM handler of its own
        loop = _SweepLoop(settings, trials, tracker, summary)
        cells = summary.total + len(trials)  # reused ones included
        loop.reject_unfit()
        next_cancel_check = time.monotonic() + CANCEL_POLL_S
        next_heartbeat = time.monotonic() + HEARTBEAT_S
        next_starts_check = time.monotonic()
        with _progress() as progress:
            bar = progress.add_task(f"sweep {sweep_id}", total=cells, running=0, failed=0)
            while loop.open:
                if interrupted.is_set():
                    raise KeyboardInterrupt
                if time.monotonic() > next_heartbeat:
                    next_heartbeat = time.monotonic() + HEARTBEAT_S
                    tracker.heartbeat()
                if time.monotonic() > next_cancel_check:
                    next_cancel_check = time.monotonic() + CANCEL_POLL_S
                    if _cancel_requested(tracker):
                        raise _Cancelled
                loop.submit_ready()
                ready = loop.wait_ready()
                if time.monotonic() > next_starts_check:
                    next_starts_check = time.monotonic() + STARTS_POLL_S
                    loop.note_starts()
                loop.end_timed_out()
                loop.collect(ready)
                progress.update(bar, completed=summary.total, running=loop.running(),
                                failed=summary.counts["FAILED"] + summary.counts["TIMEOUT"])
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
            _restore_interrupt(interrupted)
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
        if url := tracking.ui_url(uri, tracker.experiment_id):
            print(f"mlflow ui: {url}")
        print(summary.line(), flush=True)
        COMPLETED.append(summary)
    return summary


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
                   and k not in tracking.RUN_LAYOUT_TAGS and k not in report.COMPARISON_TAGS}
            metrics = {k: v for k, v in source.data.metrics.items() if k not in report.COMPARISON_METRICS}
            tracker.finish_trial(t.spec, TrialResult(t.spec.trial_key, Status.FINISHED, metrics=metrics, env=env),
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
    measuring = [t for t in trials if report.measures(t.spec.config)]
    missing = report.missing_baselines([t.spec.config for t in measuring], baseline)
    if missing:
        example = " ".join(measuring[missing[0]].spec.overrides)
        print(f"no baseline: {len(missing)} of {len(measuring)} trials have no {report.describe(baseline)} cell with "
              f"the same model, bench, eval, seed and device in this sweep (e.g. {example or 'the defaults'}); "
              f"they get no speedups or deltas. Add the baseline's choices to the sweep, or set sweep.baseline.",
              file=sys.stderr)


def _report(uri: str, sweep_id: str) -> None:
    """The comparison report on the parent run. The results are recorded by now: a report that
    fails or is interrupted loses none of them, and `orchestrator report` makes it again."""
    try:
        rows, names = report.generate(uri, sweep_id)
        if len(rows) <= REPORT_TABLE_MAX_ROWS:
            report.print_table(rows, sweep_id)
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
