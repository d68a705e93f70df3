"""A sweep's trials on Ray: one task per trial, placed, watched and ended by the driver.

Every trial is one Ray task with the CPUs, GPUs, memory and accelerator type its config
asks for (one task: its GPUs are on one node), by default in a fresh worker process
(``max_calls=1``: its memory is freed when it ends). Workers note each start on a small
actor (the board) on the head node. Ray re-runs a task whose worker or node died
(``cluster.max_retries``), so a retried trial stays one MLflow run that counts its
executions; a trial's own errors come back as FAILED results and are not retried. A trial
past ``resources.timeout_s`` is TIMEOUT and its worker is killed, freeing its GPU. A trial
that no node could ever hold is UNSUPPORTED before it is submitted.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import traceback
from collections import Counter, deque
from typing import Any, Optional

from omegaconf import DictConfig

from jobs.spec import Status, TrialResult, TrialSpec
from orchestrator import tracking
from orchestrator.plan import PlannedTrial

POLL_S = 0.5
# Trials handed to Ray at a time where cluster.max_concurrent_trials does not say: enough to keep any
# cluster (and an autoscaler's demand) busy, few enough that each pass of the loop stays short.
MAX_IN_FLIGHT = 512
# No more trials are handed to Ray while this many MLflow writes wait: results that come faster than the
# store takes them would pile up in the driver's memory.
MAX_PENDING_WRITES = 256
STARTS_POLL_S = 0.25  # how often the driver reads which trials started (a round trip to the board actor)


def run_trial(spec: TrialSpec, board, system_metrics_interval_s: Optional[float]) -> TrialResult:
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


def init_ray(cluster: DictConfig) -> bool:
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


class Interrupt(threading.Event):
    previous: dict = {}


def defer_interrupt() -> Interrupt:
    """Turn the first Ctrl-C or SIGTERM into a flag the sweep loop checks, so an interrupt
    never lands inside a bookkeeping step; a second Ctrl-C interrupts at once."""
    flag = Interrupt()
    flag.previous = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, frame):
            flag.set()
            signal.signal(signal.SIGINT, flag.previous[signal.SIGINT])

        for sig in (signal.SIGINT, signal.SIGTERM):
            flag.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, on_signal)
    return flag


def restore_interrupt(flag: Interrupt) -> None:
    for sig, handler in flag.previous.items():
        signal.signal(sig, handler)


class SweepLoop:
    """The state of one sweep while it runs: what is queued, in flight, running, done."""

    def __init__(self, settings: DictConfig, tracker: tracking.SweepTracker, counts: Counter,
                 results: dict[str, TrialResult]):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.settings, self.tracker, self.counts = settings, tracker, counts
        # key -> how it ended (status, reason, metrics: no artifacts, which can be large), for the launcher's returns
        self.results = results
        self.trials: dict[str, PlannedTrial] = {}
        self.queue: deque[str] = deque()
        self.open: set[str] = set()                 # keys whose run is not terminated yet
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
                                       max_retries=cluster.max_retries, retry_exceptions=False)(run_trial)

    def add(self, trials: list[PlannedTrial]) -> None:
        """Queue a batch: a grid sweep's only one, or a study's next step."""
        for t in trials:
            self.trials[t.spec.trial_key] = t
            self.queue.append(t.spec.trial_key)
            self.open.add(t.spec.trial_key)

    def record(self, key: str, result: TrialResult) -> None:
        nodes = self.nodes.get(key, [])
        last = result.env.pop("ray_node", None)
        if last and (not nodes or nodes[-1] != last):
            nodes.append(last)
        tags = {"ray_executions": str(max(self.executions[key], len(nodes)))}
        if nodes:
            tags["ray_nodes"] = ",".join(nodes)
        self.tracker.finish_trial(self.trials[key].spec, result, tags)
        self.results[key] = TrialResult(key, result.status, metrics=dict(result.metrics), reason=result.reason)
        self.open.discard(key)
        self.started_at.pop(key, None)
        self.counts[result.status.value] += 1

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
        cap = self.settings.cluster.max_concurrent_trials or MAX_IN_FLIGHT
        while self.queue and len(self.in_flight) < cap and self.tracker.writer.pending <= MAX_PENDING_WRITES:
            key = self.queue.popleft()
            trial = self.trials[key]
            ref = self.remote_trial.options(name=f"trial-{key}", **trial.ray_options).remote(
                trial.spec, self.board, self.settings.tracking.system_metrics_interval_s)
            self.in_flight[ref] = key

    def wait_ready(self) -> list:
        """The trials that have ended: waits up to POLL_S for one, then takes all others already done."""
        import ray

        if not self.in_flight:  # all handed out, or held back while MLflow catches up: let the writer work
            time.sleep(POLL_S)
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
