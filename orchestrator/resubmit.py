"""Re-run trials of an earlier sweep, into the same sweep: the next attempt of each trial key.

Each trial is run again as it first ran: its stored ``config.yaml`` holds its resources
(CPUs, GPUs, memory, GPU model, timeout) and the sweep's plan its cluster settings. Extra
overrides (``bench.batch_size=8``, ``resources.timeout_s=600``,
``cluster.max_concurrent_trials=4``) apply to the resubmitted trials only; they are printed
where they change what the trial first ran with, and recorded on them (tag
``resubmit_overrides``).

What the store holds is untrusted input, checked as strictly as a new command line before
anything is submitted: plain data only (no interpolation, no ``_target_``), the typed
schema and every value rule, each trial key recomputed from its config and compared, and
the model's source (``model.source``, ``model.path``, ``model.trust_remote_code``) taken
from the store only where it matches the local ``conf/model`` file or this command line
repeats it. The cluster's and the store's addresses come from this command line, never
from the store.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Optional

from jobs.spec import OPTIONAL_SECTIONS, TRIAL_SECTIONS, Status
from orchestrator import lease, pairing, plan, store
from orchestrator.compose import compose
from orchestrator import sweep_state
from orchestrator.credentials import mask
from orchestrator.errors import ConfigError

TRIAL_KEY = re.compile(r"[0-9a-f]{16}")
SWEEP_LEVEL = ("cluster.", "tracking.", "hydra.")
PLACES = ("cluster.address=", "tracking.uri=")  # where it runs and records, not how: not in resubmit_overrides
MODEL_SOURCE = ("source", "path", "trust_remote_code")
_OPTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
SELECT = {  # mode -> which trial keys are re-run, from the latest attempt's status
    "failed": {Status.FAILED.value, Status.TIMEOUT.value},
    "unfinished": {s.value for s in Status} - {Status.FINISHED.value},
}


def check_plain(node: Any, where: str, path: str = "") -> None:
    """Refuse stored data that is more than plain values: OmegaConf interpolations (``${...}``
    would be resolved here, in this user's environment), ``???``, ``_target_``, odd keys, NaN."""
    import math

    def refuse(key: str, value: Any, problem: str) -> ConfigError:
        return ConfigError(key, value, "allowed: plain values, as this project stores them",
                           problem=f"stored {where} {problem}")

    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str) or not _KEY.fullmatch(key) or key == "_target_":
                raise refuse(f"{path}{key}", value, "has a key this project never writes")
            check_plain(value, where, f"{path}{key}.")
    elif isinstance(node, list):
        for item in node:
            check_plain(item, where, path)
    elif isinstance(node, str):
        if "${" in node or node == "???":
            raise refuse(path.rstrip("."), node, "holds an interpolation")
    elif isinstance(node, float):
        if not math.isfinite(node):
            raise refuse(path.rstrip("."), node, "holds a number that is not finite")
    elif not (node is None or isinstance(node, (bool, int))):
        raise refuse(path.rstrip("."), type(node).__name__, "holds a value that is not plain data")


def _check_sections(stored: Any, where: str) -> dict:
    """Refuse a stored config that is not what this project writes."""
    expected = {*TRIAL_SECTIONS, "resources"}
    required = expected - set(OPTIONAL_SECTIONS)
    if not isinstance(stored, dict) or not required <= set(stored) <= expected:
        odd = (sorted(map(str, (set(stored) - expected) | (required - set(stored)))) if isinstance(stored, dict)
               else [type(stored).__name__])
        raise ConfigError(f"config.yaml of {where}", ", ".join(odd),
                          f"allowed sections: {', '.join((*TRIAL_SECTIONS, 'resources'))}",
                          problem="stored config has unexpected contents")
    check_plain(stored, f"config of {where}")
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
        try:
            return yaml.safe_load(Path(path).read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ConfigError(f"config.yaml of run {run_id}", type(error).__name__, "plain YAML, as this project "
                              "writes it", problem="stored config is not plain YAML") from None


class _ModelSources:
    """What ``conf/model/<name>.yaml`` says of a model's source, to hold a stored one against."""

    def __init__(self, command_line: set[str]):
        self.command_line, self.configured = command_line, {}

    def check(self, model: dict, where: str) -> None:
        name = model.get("name")
        if name not in self.configured:
            self.configured[name] = None
            if isinstance(name, str) and _OPTION_NAME.fullmatch(name):
                try:
                    found = compose(f"model={name}").model
                    self.configured[name] = {k: found[k] for k in MODEL_SOURCE}
                except Exception:  # no conf/model file of that name: only this command line vouches
                    pass
        configured = self.configured[name]
        for key in MODEL_SOURCE:
            if f"model.{key}" in self.command_line or (configured and configured[key] == model.get(key)):
                continue
            allowed = (f"conf/model/{name}.yaml's value ({configured[key]})" if configured else
                       f"no conf/model file is named {name}")
            raise ConfigError(f"model.{key}", model.get(key), f"allowed: {allowed}, or the value repeated on this "
                              f"command line (model.{key}=...)",
                              problem=f"stored in {where}, not taken from the store unless this command line says so")


def _restore_settings(base, stored: dict, command_line: set[str]) -> list[str]:
    """Put the sweep's stored settings into ``base`` where this command line does not set them;
    the lines saying what the command line changes."""
    from omegaconf import open_dict

    changes = []
    with open_dict(base):
        for section, values in stored.items():
            for key, value in values.items():
                if f"{section}.{key}" not in command_line:
                    base[section][key] = value
                elif base[section][key] != value:
                    changes.append(f"{section}.{key}={base[section][key]} (the sweep ran with {value})")
    return changes


@dataclass
class Resubmission:
    """What a resubmission will run, under the sweep's lease that this process holds."""
    state: sweep_state.SweepState
    settings: Any  # the sweep-level config sections (DictConfig)
    trials: list[plan.PlannedTrial]
    skipped: list[str]  # keys with a FINISHED attempt, not re-run
    holder: lease.Holder
    client: Any

    def release(self) -> None:
        lease.release(self.client, self.state.parent_run_id, self.holder)


def prepare(uri: str, sweep_id: str, mode: str, overrides: list[str], force: bool,
            address: Optional[str]) -> Resubmission:
    """Take the sweep's lease, close the runs a dead driver left open (FAILED, "driver lost"), and plan
    the trials to re-run. Raises ConfigError with nothing run (and the lease released) for bad input."""
    state = sweep_state.load(uri, sweep_id, refresh=True)
    client = store.client(uri)
    # One driver per sweep: taken before anything is closed or read for re-running.
    holder = lease.take(client, sweep_id, state.parent_run_id, address)
    try:
        if state.sweep_status == "RUNNING":
            closed = sweep_state.close_open_runs(client, state, Status.FAILED, "driver lost: the sweep's driver died")
            print(f"sweep {sweep_id}: its driver is gone; closed {closed} open runs FAILED (driver lost)")
        # Every run, not the index: what is re-run must be what the store holds now.
        state = sweep_state.load(uri, sweep_id, refresh=True)
        settings, trials, skipped = plan_trials(client, state, mode, [f"tracking.uri={uri}", *overrides], force)
    except BaseException:
        lease.release(client, state.parent_run_id, holder)
        raise
    return Resubmission(state, settings, trials, skipped, holder, client)


def plan_trials(client, state: sweep_state.SweepState, mode: str, overrides: list[str], force: bool):
    """The PlannedTrials to re-run, their settings, and the keys skipped as already finished. A bad
    override or a stored config that fails the checks raises ConfigError, or a Hydra or OmegaConf error
    that compose.from_hydra turns into one (a wrong type), and nothing is submitted."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    sweep_level = [o for o in overrides if o.startswith(SWEEP_LEVEL)]
    trial_level = [o for o in overrides if not o.startswith(SWEEP_LEVEL)]
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(trial_level)
    command_line = {o.key_or_group for o in [*parsed, *parser.parse_overrides(sweep_level)]}
    stored_plan = sweep_state.stored_plan(client, state.parent_run_id)
    experiment = client.get_experiment(state.experiment_id).name
    check_plain({"name": experiment}, "experiment name")
    base = compose(*sweep_level)
    models = _ModelSources(command_line)
    with open_dict(base):
        base.sweep.id, base.sweep.name = state.sweep_id, experiment
        if "baseline" in state.tags:  # the sweep's own, not today's default
            base.sweep.baseline = pairing.stored_baseline(state.tags)
    changes = _restore_settings(base, stored_plan.settings, command_line) if stored_plan else []
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
    if mode == "unfinished" and stored_plan:
        have = {t.trial_key for t in state.trials if t.run_id}
        sources += [(c.trial_key, c.overrides, c.config, 1, f"planned trial {c.trial_key} (no run)")
                    for c in stored_plan.trials if c.trial_key not in have]
    trials = []
    for key, overrides, stored, attempt, where in sources:
        _check_sections(stored, where)
        if plan.trial_key(stored) != key:
            raise ConfigError(f"trial key of {where}", key, f"the key of its stored config "
                              f"({plan.trial_key(stored)})", problem="stored config and key disagree")
        models.check(stored["model"], where)
        stored = _nest_backend_options(stored)
        cell = OmegaConf.merge(base, {k: v for k, v in stored.items() if k != "resources"})
        with open_dict(cell):
            cell.resources = OmegaConf.merge(cell.resources, stored["resources"])
        before = {f"resources.{k}": v for k, v in OmegaConf.to_container(cell.resources).items()}
        ConfigLoaderImpl._apply_overrides_to_config(parsed, cell)
        changes += [f"{k}={cell.resources[k.split('.')[1]]} (trial {key} ran with {v})"
                    for k, v in before.items() if k in command_line and cell.resources[k.split('.')[1]] != v]
        planned = plan.planned_trial(cell, [*(overrides.split() if overrides else []), *trial_level])
        changed = (*trial_level, *(mask(o) for o in sweep_level if not o.startswith(PLACES)))
        trials.append(dataclasses.replace(planned, spec=dataclasses.replace(
            planned.spec, trial_key=key, attempt=attempt, resubmit_overrides=changed)))
    skipped = [t.trial_key for t in state.trials if t.status == Status.FINISHED.value and not force]
    for change in dict.fromkeys(changes):
        print(f"resubmit: {change}")
    return plan.sweep_settings([base]), trials, skipped
