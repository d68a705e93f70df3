"""Re-run trials of an earlier sweep, into the same sweep: the next attempt of each trial key.

What is re-run is read back from MLflow (each trial's stored ``config.yaml``), so before
anything is submitted every stored config is checked as a user's input would be: merged
into the typed schema (unknown keys and wrong types refused), no ``_target_`` outside
this project, every value rule. Extra overrides (``bench.batch_size=8``) apply to the
resubmitted trials only and are recorded on them (tag ``resubmit_overrides``).

A sweep whose driver died (even by SIGKILL) leaves runs RUNNING; they are closed FAILED
with the reason "driver lost" first. A driver that is still alive is never overridden:
resubmission refuses until it ends or is cancelled.
"""

from __future__ import annotations

import json
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from jobs.spec import TRIAL_SECTIONS, Status
from orchestrator import plan, remote, tracking
from orchestrator import status as sweep_status
from orchestrator.errors import ConfigError

PROJECT_PACKAGES = ("orchestrator.", "jobs.", "kernels.", "hydra_plugins.")
TRIAL_KEY = re.compile(r"[0-9a-f]{16}")
HEARTBEAT_STALE_S = 180  # a driver on another host is lost once its heartbeat is this old
SWEEP_LEVEL = ("cluster.", "tracking.", "hydra.")
SELECT = {  # mode -> which trial keys are re-run, from the latest attempt's status
    "failed": {Status.FAILED.value, Status.TIMEOUT.value},
    "unfinished": {s.value for s in Status} - {Status.FINISHED.value},
}


def driver_alive(tags: dict[str, str]) -> Optional[str]:
    """Where the sweep's driver still runs ("pid 123 on host h", "ray job ..."), or None if it is gone."""
    if tags.get("ray_job_submission_id") and tags.get("ray_dashboard"):
        job = remote.job_info(tags["ray_dashboard"], tags["ray_job_submission_id"])
        return None if job is None or job["status"] in ("STOPPED", "SUCCEEDED", "FAILED") else \
            f"ray job {tags['ray_job_submission_id']} ({job['status']})"
    host, pid = tags.get("driver_host"), int(tags.get("driver_pid", "0"))
    if host == socket.gethostname() and pid:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return f"pid {pid} on {host}" if b"orchestrator" in cmdline else None
    heartbeat = float(tags.get("heartbeat", "0"))
    return f"host {host} (heartbeat {time.time() - heartbeat:.0f} s ago)" if time.time() - heartbeat < \
        HEARTBEAT_STALE_S else None


def _check_safe(stored: Any, where: str) -> dict:
    """Refuse a stored config that is not what this project writes."""
    expected = {*TRIAL_SECTIONS, "resources"}
    if not isinstance(stored, dict) or set(stored) != expected:
        odd = sorted(set(stored) ^ expected) if isinstance(stored, dict) else [type(stored).__name__]
        raise ConfigError(f"config.yaml of {where}", ", ".join(map(str, odd)),
                          f"allowed sections: {', '.join((*TRIAL_SECTIONS, 'resources'))}",
                          problem="stored config has unexpected contents")

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "_target_" and not (isinstance(value, str) and value.startswith(PROJECT_PACKAGES)):
                    raise ConfigError(f"{path}{key}", value, f"a target inside this project "
                                                             f"({', '.join(p + '*' for p in PROJECT_PACKAGES)})",
                                      problem=f"stored config of {where} instantiates code outside the project")
                walk(value, f"{path}{key}.")
        elif isinstance(node, list):
            for item in node:
                walk(item, path)
    walk(stored, "")
    return stored


def _nest_backend_options(stored: dict) -> dict:
    """A config stored before each backend's options moved under its name (``backend.sleep_s`` is
    ``backend.noop.sleep_s`` now), in today's layout; the trial keeps its stored key."""
    backend = stored.get("backend")
    if isinstance(backend, dict):
        legacy = {k: backend.pop(k) for k in ("sleep_s", "allocate_gb") if k in backend}
        if legacy and backend.get("name") == "noop":
            backend["noop"] = legacy
    return stored


def _stored_config(client, run_id: str) -> Any:
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "config.yaml", tmp)
        return yaml.safe_load(Path(path).read_text())


def plan_trials(client, state: sweep_status.SweepState, mode: str, overrides: list[str], force: bool):
    """The PlannedTrials to re-run, their settings, and the keys skipped as already finished.
    Raises ConfigError (nothing is submitted) for a bad override or a stored config that fails the checks."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    from orchestrator import schema
    from orchestrator.cli import CONF_DIR

    sweep_level = [o for o in overrides if o.startswith(SWEEP_LEVEL)]
    trial_level = [o for o in overrides if not o.startswith(SWEEP_LEVEL)]
    parsed = OverridesParser.create().parse_overrides(trial_level)
    schema.register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        experiment = client.get_experiment(state.experiment_id).name
        base = compose(config_name="config", overrides=[*sweep_level, f"sweep.id={state.sweep_id}",
                                                        f"sweep.name={experiment}"])
    if "baseline" in state.tags:  # the sweep's own, not today's default
        with open_dict(base):
            base.sweep.baseline = json.loads(state.tags["baseline"])
    # Cells with no run yet (never started by a driver that died) come from the sweep's plan, below.
    chosen = [t for t in state.trials if t.run_id and
              (t.status in SELECT[mode] or (force and t.status == Status.FINISHED.value))]
    # (trial key, its overrides, its stored config, the attempt to run, where the config came from)
    sources = []
    for row in chosen:
        if not TRIAL_KEY.fullmatch(row.trial_key):
            raise ConfigError(f"trial_key tag of run {row.run_id}", row.trial_key, "16 hex digits",
                              problem="stored tag is not a trial key")
        if row.latest_attempt < 1:
            raise ConfigError(f"attempt tag of run {row.run_id}", "?", "a positive integer",
                              problem="stored tag is not an attempt number")
        sources.append((row.trial_key, row.overrides, _stored_config(client, row.run_id),
                        max(row.attempts, row.latest_attempt) + 1, f"trial {row.trial_key} (run {row.run_id})"))
    if mode == "unfinished":
        have = {t.trial_key for t in state.trials if t.run_id}
        sources += [(key, overrides, config, 1, f"planned trial {key} (no run)")
                    for key, overrides, config in sweep_status.planned_without_run(client, state.parent_run_id, have)]
    trials = []
    for key, overrides, stored, attempt, where in sources:
        if not TRIAL_KEY.fullmatch(key):
            raise ConfigError(f"trial key in the plan of sweep {state.sweep_id}", key, "16 hex digits",
                              problem="stored plan has a bad trial key")
        stored = _nest_backend_options(_check_safe(stored, where))
        cell = OmegaConf.merge(base, {k: v for k, v in stored.items() if k != "resources"})
        with open_dict(cell):
            cell.resources = OmegaConf.merge(cell.resources, stored["resources"])
        ConfigLoaderImpl._apply_overrides_to_config(parsed, cell)
        original = overrides.split() if overrides else []
        planned = plan.planned_trial(cell, [*original, *trial_level])
        spec = planned.spec.__class__(trial_key=key, config=planned.spec.config, overrides=planned.spec.overrides,
                                      attempt=attempt, resubmit_overrides=tuple(trial_level))
        trials.append(planned.__class__(spec, planned.ray_options, planned.timeout_s, planned.baseline))
    skipped = [t.trial_key for t in state.trials if t.status == Status.FINISHED.value and not force]
    return plan.sweep_settings([base]), trials, skipped


