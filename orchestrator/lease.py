"""One driver per sweep: a lease on the sweep's parent run, taken by compare-and-set.

The lease of generation ``n`` is the parent run's param ``driver.<n>``, whose value names
its holder (host, pid, when, a nonce). MLflow params cannot change once logged, and the
store checks that in one transaction, so of two drivers that try to log ``driver.<n>``
at the same moment exactly one succeeds: a compare-and-set that works across hosts
through the store, sqlite file or tracking server alike. ``run`` takes generation 1 of
the sweep it creates; ``resubmit`` and ``resume`` take the next one, and only when its
holder is gone: it released the lease (tag ``driver_released``), or its process is dead
(same host; a live process with its pid that started later is another one), its Ray Job has
ended, or its heartbeat is stale (another host).
"""

from __future__ import annotations

import re
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from orchestrator.errors import ConfigError

PARAM = "driver.{}"
RELEASED_TAG = "driver_released"
STALE_S = 180.0  # a driver on another host is gone once its heartbeat is this old
_PARAM = re.compile(r"driver\.([1-9][0-9]{0,5})")
_HOLDER = re.compile(r"(?P<host>[A-Za-z0-9_.-]{1,253}) (?P<pid>[1-9][0-9]{0,9}) (?P<since>[0-9]{1,12}(\.[0-9]{1,6})?) "
                     r"(?P<nonce>[0-9a-f]{16})")
_SECONDS = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:253] or "unknown"


@dataclass(frozen=True)
class Holder:
    generation: int
    host: str
    pid: int
    since: float
    nonce: str

    @classmethod
    def me(cls, generation: int) -> "Holder":
        import os

        return cls(generation, _host(), os.getpid(), round(time.time(), 3), secrets.token_hex(8))

    def value(self) -> str:
        return f"{self.host} {self.pid} {self.since:.3f} {self.nonce}"

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.since, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"pid {self.pid} on {self.host}, since {since}"


def latest(run) -> Optional[Holder]:
    """The holder of the run's latest lease (None: never taken); a malformed one is refused."""
    generations = {}
    for key, value in run.data.params.items():
        if key.startswith("driver."):
            if not _PARAM.fullmatch(key):
                raise ConfigError(f"param {key} of run {run.info.run_id}", value, "driver.<1-999999>",
                                  problem="stored lease has a bad name")
            generations[int(key.split(".")[1])] = value
    if not generations:
        # A sweep started before leases: its driver is the one its tags name, while its run is open.
        pid = run.data.tags.get("driver_pid", "")
        if run.info.status != "RUNNING" or not pid.isdigit():
            return None
        return Holder(0, run.data.tags.get("driver_host", ""), int(pid), _seconds(run, "heartbeat"), "0" * 16)
    generation = max(generations)
    found = _HOLDER.fullmatch(generations[generation])
    if found is None:
        raise ConfigError(f"param driver.{generation} of run {run.info.run_id}", generations[generation],
                          "<host> <pid> <unix time> <16 hex digits>", problem="stored lease is malformed")
    return Holder(generation, found["host"], int(found["pid"]), float(found["since"]), found["nonce"])


def _seconds(run, tag: str) -> float:
    text = run.data.tags.get(tag, "0")
    if not _SECONDS.fullmatch(text):
        raise ConfigError(f"tag {tag} of run {run.info.run_id}", text, "a unix time in seconds",
                          problem="stored tag is malformed")
    return float(text)


def where_alive(holder: Holder, run, sweep_id: str, address: Optional[str]) -> Optional[str]:
    """Where the lease's holder still runs ("pid 12 on host h ..."), or None if it is gone."""
    from orchestrator import remote

    if run.data.tags.get(RELEASED_TAG) == str(holder.generation):
        return None
    if "ray_job_submission_id" in run.data.tags and address:  # the address is the user's, never a tag's
        job = remote.job_info(address, remote.submission_id(sweep_id))
        if job is not None:
            return None if job["status"] in ("STOPPED", "SUCCEEDED", "FAILED") else \
                f"ray job {job['submission_id']} ({job['status']})"
    if holder.host == _host():
        import psutil

        try:  # a process with its pid that started after the lease was taken is another one (pid reuse)
            started = psutil.Process(holder.pid).create_time()
        except psutil.Error:
            return None
        return holder.describe() if started <= holder.since + 1 else None
    heard = max(holder.since, _seconds(run, "heartbeat"))
    return f"{holder.describe()}, heartbeat {time.time() - heard:.0f} s ago" if time.time() - heard < STALE_S \
        else None


def take(client, sweep_id: str, run_id: str, address: Optional[str]) -> Holder:
    """The next lease on the sweep's parent run, for this process; ConfigError naming the holder
    if another driver has it."""
    from mlflow.exceptions import MlflowException

    run = client.get_run(run_id)
    current = latest(run)
    if current is not None and (where := where_alive(current, run, sweep_id, address)):
        raise _held(sweep_id, where)
    mine = Holder.me(current.generation + 1 if current else 1)
    try:
        client.log_param(run_id, PARAM.format(mine.generation), mine.value())
    except MlflowException as error:
        if "changing param values is not allowed" not in str(error).lower():
            raise
        winner = latest(client.get_run(run_id))
        raise _held(sweep_id, f"{winner.describe() if winner else 'another driver'}, which took it just now") \
            from None
    return mine


def claim_new(client, run_id: str) -> Holder:
    """Generation 1 of a sweep this process has just created (no one else knows its run yet)."""
    mine = Holder.me(1)
    client.log_param(run_id, PARAM.format(1), mine.value())
    return mine


def release(client, run_id: str, holder: Holder) -> None:
    client.set_tag(run_id, RELEASED_TAG, str(holder.generation))


def _held(sweep_id: str, where: str) -> ConfigError:
    return ConfigError("sweep", sweep_id, f"one driver per sweep: wait for it to end, or stop it "
                                          f"(orchestrator cancel {sweep_id})",
                       problem=f"another driver is acting on it ({where})")
