"""Adaptive sweeps: Optuna chooses the cells, the Ray launcher runs them batch by batch, one sweep.

``hydra/sweeper=optuna`` (its config: orchestrator/sweepers.py; the ``optuna`` extra) is Hydra's Optuna
sweeper's surface (its samplers, ``n_trials``, ``n_jobs``, ``params`` in Hydra's sweep syntax) with the
objectives named as metrics: ``hydra.sweeper.objectives={kl_divergence:minimize,bits_per_element:minimize}``.
Each step asks Optuna for ``n_jobs`` trials, launches their cells as one batch of the sweep (one MLflow
parent run and one sweep id for the whole study; every cell an ordinary child run), and tells Optuna each
cell's objectives from its metrics. A trial that did not finish (FAILED, UNSUPPORTED, TIMEOUT, CANCELLED)
or lacks an objective's metric is told as a failed Optuna trial, never as a number. Cells that resolve to a
trial the sweep already ran (a sampler often proposes a discrete cell again) are not run again.

The study lives on the parent run as ``study.json`` (its definition and every Optuna trial: number, batch,
params, state, trial key), written when a step is planned and when it is told. ``orchestrator resume ID``
continues a study whose driver died (:func:`prepare_resume`): the trials it had told come back from their runs' metrics, the ones it had
asked but not seen end are asked again first, and the study goes on to ``n_trials``. Everything read back
is checked as strictly as a new command line: the sampler is one of a fixed list built from plain
arguments (no ``_target_`` from the store), overrides are parsed and refused where they would name a
store, a cluster, Hydra's own settings or a model's source.

Optuna is imported only when a study runs: without the extra, ``hydra/sweeper=optuna`` says how to
install it.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from orchestrator import sweepers
from orchestrator.errors import ConfigError

DIRECTIONS = ("minimize", "maximize")
# The samplers a study may use, by class name in optuna.samplers (Hydra's hydra/sweeper/sampler configs name
# them as _target_), and whether each handles several objectives.
SAMPLERS = {"TPESampler": True, "MOTPESampler": True, "NSGAIISampler": True, "RandomSampler": True,
            "CmaEsSampler": False}
STATES = ("COMPLETE", "FAIL", "RUNNING")  # an Optuna trial's state as stored: RUNNING is asked, not yet told
_METRIC = re.compile(r"[A-Za-z0-9_.:/-]{1,250}")
_PARAM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:[./][A-Za-z_][A-Za-z0-9_-]*)*")
# Overrides a stored study may not bring back: where it runs and records (taken from the resuming command
# line, as resubmit does), Hydra's own settings, the sweep's identity, and a model's source.
_REFUSED_KEYS = ("hydra", "tracking", "cluster.address", "sweep.id", "sweep.name", "model.source", "model.path",
                 "model.trust_remote_code")
UNSTORED = ("tracking.", "cluster.address", "sweep.id", "sweep.name")  # given again by the resuming command
_EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
MAX_TRIALS = 100_000


def _install_hint() -> ConfigError:
    return ConfigError("hydra/sweeper", "optuna", "allowed: install the extra first: pip install -e '.[optuna]'",
                       problem="Optuna's sweeper is not installed")


def _optuna():
    try:
        import optuna
        from hydra_plugins.hydra_optuna_sweeper import _impl  # noqa: F401 (the plugin's override parsing)
    except ImportError:
        raise _install_hint() from None
    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep's own progress says what happens
    # add_trial and enqueue_trial, which a resume uses, are marked experimental in Optuna 2.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


@dataclass
class Definition:
    """What a study is: stored in study.json, checked when read back."""
    objectives: dict[str, str]           # metric -> minimize | maximize, in order
    space: dict[str, dict[str, Any]]     # param (an override key) -> Optuna distribution as JSON
    fixed: dict[str, str]                # override key -> value, the same in every cell
    sampler: dict[str, Any]              # {"name": one of SAMPLERS, "kwargs": plain values}
    n_trials: int
    n_jobs: int
    max_failure_rate: float

    def check(self, where: str) -> None:
        if not self.objectives:
            raise ConfigError(f"{where}objectives", "{}", "allowed: one or more metric names with minimize or "
                              "maximize, e.g. {kl_divergence:minimize,bits_per_element:minimize}",
                              problem="no objective")
        for metric, direction in self.objectives.items():
            if not isinstance(metric, str) or not _METRIC.fullmatch(metric):
                raise ConfigError(f"{where}objectives", metric, "allowed: a metric name (letters, digits, _.:/-)")
            if direction not in DIRECTIONS:
                raise ConfigError(f"{where}objectives.{metric}", direction, f"allowed: {', '.join(DIRECTIONS)}")
        if not self.space:
            raise ConfigError(f"{where}params", "{}", "allowed: one or more searched keys in Hydra's sweep syntax, "
                              "e.g. dtype: choice(int4,int8) or backend.noop.x: interval(-1,1)",
                              problem="nothing to search")
        for key in self.space:
            _check_key(key, f"{where}params")
        for key in self.fixed:
            _check_key(key, "override")
        name = self.sampler.get("name")
        if name not in SAMPLERS:
            raise ConfigError(f"{where}sampler", name, f"allowed: {', '.join(f'optuna.samplers.{s}' for s in SAMPLERS)}"
                              " (hydra/sweeper/sampler=tpe, motpe, nsgaii, random or cmaes); for a full grid, the "
                              "default sweeper")
        if len(self.objectives) > 1 and not SAMPLERS[name]:
            raise ConfigError(f"{where}sampler", name, "allowed with several objectives: TPESampler, MOTPESampler, "
                              "NSGAIISampler, RandomSampler", problem="a single-objective sampler")
        for key, value, low, high in (("n_trials", self.n_trials, 1, MAX_TRIALS), ("n_jobs", self.n_jobs, 1, 4096)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(f"{where}{key}", value, f"allowed: an integer from {low} to {high}")
        if not isinstance(self.max_failure_rate, (int, float)) or not 0 <= self.max_failure_rate <= 1:
            raise ConfigError(f"{where}max_failure_rate", self.max_failure_rate, "allowed: 0 to 1")


def _check_key(key: str, where: str) -> None:
    if not isinstance(key, str) or not _PARAM.fullmatch(key):
        raise ConfigError(where, key, "allowed: a config key (model.name) or group (dtype)",
                          problem="not a key this study can set")
    if where != "override" and (key == "experiment" or key.startswith(("cluster.", "tracking.", "sweep.", "hydra"))):
        raise ConfigError(where, key, "allowed: a trial's keys and groups (the sweep's own settings are the same "
                          "for every cell)", problem="cannot be searched")


def definition_from_config(sweeper: "StudySweeper", arguments: Sequence[str]) -> Definition:
    """The study the command line and ``hydra.sweeper`` describe."""
    _optuna()
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import distribution_to_json

    where = "hydra.sweeper."
    given = [f"{k}={v}" for k, v in (sweeper.params or {}).items()] + list(arguments)
    try:
        space, fixed = create_params_from_overrides(given)
    except (NotImplementedError, AssertionError) as error:
        raise ConfigError(f"{where}params", " ".join(given)[:200], "allowed: choice(...), range(...) or "
                          "interval(...) sweeps, and plain key=value overrides", problem=str(error)[:200]) from None
    for key in space:
        fixed.pop(key, None)
    target = str(sweeper.sampler.get("_target_", "")) if isinstance(sweeper.sampler, (dict, DictConfig)) else ""
    name = target.rpartition(".")[2] if target.startswith("optuna.samplers.") else target or str(sweeper.sampler)
    kwargs = {k: v for k, v in OmegaConf.to_container(sweeper.sampler, resolve=True).items()
              if not k.startswith("_")} if isinstance(sweeper.sampler, DictConfig) else {}
    definition = Definition(
        objectives=dict(OmegaConf.to_container(sweeper.objectives, resolve=True)) if isinstance(
            sweeper.objectives, DictConfig) else dict(sweeper.objectives or {}),
        space={k: json.loads(distribution_to_json(d)) for k, d in space.items()},
        fixed={k: str(v) for k, v in fixed.items()},
        sampler={"name": name, "kwargs": kwargs}, n_trials=sweeper.n_trials, n_jobs=sweeper.n_jobs,
        max_failure_rate=sweeper.max_failure_rate)
    definition.check(where)
    _sampler(definition)  # its arguments checked before anything runs
    return definition


def _sampler(definition: Definition):
    """The definition's sampler, built from the fixed list with plain arguments it accepts."""
    import inspect

    optuna = _optuna()
    name, kwargs = definition.sampler["name"], definition.sampler.get("kwargs", {})
    cls = getattr(optuna.samplers, name)
    accepted = inspect.signature(cls).parameters
    for key, value in kwargs.items():
        if key not in accepted:
            raise ConfigError(f"hydra.sweeper.sampler.{key}", value, f"allowed: {', '.join(accepted)}",
                              problem=f"not an argument of {name}")
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise ConfigError(f"hydra.sweeper.sampler.{key}", type(value).__name__, "allowed: plain values",
                              problem="not a plain value")
    try:
        return cls(**{k: v for k, v in kwargs.items() if v is not None or accepted[k].default is None})
    except (TypeError, ValueError) as error:
        raise ConfigError("hydra.sweeper.sampler", name, "allowed: the sampler's documented arguments",
                          problem=str(error)[:200]) from None


# ---- the study's record on the parent run ----------------------------------------------------------

@dataclass
class TrialRecord:
    """One Optuna trial as study.json holds it."""
    number: int
    batch: int
    params: dict[str, Any]
    state: str                       # COMPLETE, FAIL, or RUNNING (asked, not yet told)
    trial_key: str = ""
    values: Optional[list[float]] = None
    reason: str = ""                 # why it was told as failed
    system_attrs: dict[str, Any] = field(default_factory=dict)  # the sampler's own (NSGA-II's generation)


def study_json(definition: Definition, trials: Sequence[TrialRecord]) -> str:
    """study.json's text: the fixed overrides less where the sweep runs and records and what it is called
    (a resume takes those from its own command line and the store), and every trial."""
    stored = {**asdict(definition), "fixed": {k: v for k, v in definition.fixed.items() if not k.startswith(UNSTORED)}}
    return json.dumps({"definition": stored, "trials": [asdict(t) for t in trials]})


def read(client, parent) -> Optional[tuple[Definition, list[TrialRecord]]]:
    """The sweep's stored study, checked as untrusted input (ConfigError); None for a sweep that is no study."""
    from orchestrator import store, tracking
    from orchestrator.pairing import MAX_FILE_BYTES
    from orchestrator.resubmit import TRIAL_KEY, check_plain
    from orchestrator.sweep_state import refuse_json_constant

    where = f"{tracking.STUDY_FILE} of run {parent.info.run_id}"
    try:
        text = store.download_text(client, parent.info.run_id, tracking.STUDY_FILE, MAX_FILE_BYTES)
    except ValueError as error:
        raise ConfigError(where, "?", "the study this project writes", problem=str(error)[:200]) from None
    if text is None:
        return None

    def bad(what: str, value: Any) -> ConfigError:
        return ConfigError(where, str(value)[:80], "the study this project writes", problem=f"stored study has {what}")

    try:
        data = json.loads(text, parse_constant=refuse_json_constant)
    except ValueError:
        raise bad("text that is not JSON", text[:40]) from None
    if not isinstance(data, dict) or set(data) != {"definition", "trials"} or not isinstance(data["trials"], list):
        raise bad("unexpected contents", sorted(data) if isinstance(data, dict) else type(data).__name__)
    raw = data["definition"]
    names = {f.name for f in Definition.__dataclass_fields__.values()}
    if not isinstance(raw, dict) or set(raw) != names:
        raise bad("a definition with unexpected contents", raw)
    check_plain({k: v for k, v in raw.items() if k not in ("space", "objectives", "fixed")}, where)
    for key in ("objectives", "fixed", "space"):
        if not isinstance(raw[key], dict) or not all(isinstance(k, str) for k in raw[key]):
            raise bad(f"a {key} that is not a mapping", raw[key])
    if not all(isinstance(v, str) for v in (*raw["objectives"].values(), *raw["fixed"].values())):
        raise bad("an objective or override that is not text", raw)
    if not isinstance(raw["sampler"], dict) or set(raw["sampler"]) != {"name", "kwargs"} or \
            not isinstance(raw["sampler"]["kwargs"], dict):
        raise bad("a sampler this project does not write", raw["sampler"])
    definition = Definition(**raw)
    definition.check("stored study's ")
    for key, value in definition.fixed.items():
        _check_stored_override(key, value)
    _sampler(definition)
    distributions = _distributions(definition, where)
    trials = []
    for item in data["trials"]:
        if not isinstance(item, dict) or set(item) != set(TrialRecord.__dataclass_fields__):
            raise bad("a trial with unexpected contents", item)
        record = TrialRecord(**item)
        if not _plain_json(record.system_attrs) or not isinstance(record.system_attrs, dict) or \
                not all(_ATTR.fullmatch(k) for k in record.system_attrs):
            raise bad("sampler attributes this project does not write", record.system_attrs)
        if record.values is not None and not (isinstance(record.values, list) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in record.values)):
            raise bad("values that are not numbers", record.values)
        if not isinstance(record.params, dict) or not _plain_json(list(record.params.values())):
            raise bad("params that are not plain values", record.params)
        if set(record.params) != set(distributions):
            raise bad("a trial whose params are not the study's", record.params)
        if not isinstance(record.number, int) or record.number != len(trials) or not isinstance(record.batch, int):
            raise bad("trials out of order", record.number)
        if record.state not in STATES or not isinstance(record.reason, str):
            raise bad("a trial state this project does not write", record.state)
        if record.trial_key and not TRIAL_KEY.fullmatch(str(record.trial_key)):
            raise bad("a bad trial key", record.trial_key)
        for name, value in record.params.items():
            if not distributions[name]._contains(distributions[name].to_internal_repr(value)):
                raise bad(f"a value of {name} outside its distribution", value)
        trials.append(record)
    return definition, trials


_ATTR = re.compile(r"[A-Za-z0-9_:.-]{1,100}")


def _plain_json(value: Any, depth: int = 0) -> bool:
    """Numbers, text without interpolation, and lists and mappings of them, a few levels deep."""
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return "${" not in value and len(value) <= 1000
    if depth < 3 and isinstance(value, list):
        return all(_plain_json(v, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict):
        return all(isinstance(k, str) and _ATTR.fullmatch(k) and _plain_json(v, depth + 1) for k, v in value.items())
    return False


def _distributions(definition: Definition, where: str) -> dict[str, Any]:
    from optuna.distributions import json_to_distribution

    _optuna()
    out = {}
    for key, value in definition.space.items():
        try:
            out[key] = json_to_distribution(json.dumps(value))
        except Exception:  # json_to_distribution raises whatever the text makes it
            raise ConfigError(where, key, "a distribution Optuna writes", problem="stored study has a bad "
                              "distribution") from None
        for choice in getattr(out[key], "choices", ()):
            if isinstance(choice, str) and ("${" in choice or "=" in choice):
                raise ConfigError(where, choice, "plain choices", problem="stored study has an odd choice")
    return out


def _check_stored_override(key: str, value: str) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if key.startswith("hydra") or key in _REFUSED_KEYS or key.startswith(tuple(f"{k}." for k in _REFUSED_KEYS)):
        raise ConfigError(f"stored override {key}", value, "allowed: a trial's keys and groups; give where the sweep "
                          "runs and records, and a model's source, on this command line",
                          problem="not taken from the store")
    if "${" in value or "_target_" in value:
        raise ConfigError(f"stored override {key}", value, "allowed: plain values", problem="holds an interpolation")
    try:
        parsed = OverridesParser.create().parse_overrides([f"{key}={value}"])[0]
    except Exception:
        raise ConfigError(f"stored override {key}", value, "allowed: key=value", problem="cannot be parsed") from None
    if parsed.is_sweep_override() or parsed.is_add() or parsed.is_delete() or parsed.is_force_add():
        raise ConfigError(f"stored override {key}", value, "allowed: key=value", problem="not a plain override")


# ---- running it ------------------------------------------------------------------------------------

@dataclass
class Resume:
    """What `orchestrator resume` hands the sweeper: the stored study and the sweep to reopen."""
    definition: Definition
    trials: list[TrialRecord]
    sweep_arguments: dict[str, Any]  # orchestrator.sweep.Sweep's: reopen, prior_rows, prior_plan, holder
    metrics: dict[str, dict[str, float]]  # trial key -> its FINISHED run's metrics
    statuses: dict[str, str]              # trial key -> its latest run's status
    command: list[str]                    # the `orchestrator run` arguments that resume it
    client: Any                           # the store's MlflowClient
    opened: bool = False                  # whether the sweep was reopened (its end then released the lease)


RESUMING: list[Resume] = []  # set by prepare_resume for the Hydra run that follows; taken by the sweeper
# On resume, the command line may change how many trials the study runs and how many at a time.
RESUME_SETTINGS = ("hydra.sweeper.n_trials", "hydra.sweeper.n_jobs")


def prepare_resume(uri: str, sweep_id: str, stored: tuple[Definition, list[TrialRecord]], overrides: list[str],
                   address: Optional[str]) -> Resume:
    """`orchestrator resume ID` for a study: take the sweep's lease, close the runs a dead driver left open
    (FAILED, "driver lost"), and hand the sweeper (through RESUMING) what it needs to rebuild the study from
    the runs and go on to ``n_trials`` in the same sweep; ``command`` is the `run` to start, and
    :func:`finish_resume` comes after it. ``overrides``: plain overrides for the cells from now on, and
    hydra.sweeper.n_trials / n_jobs."""
    import dataclasses

    from jobs.spec import Status
    from orchestrator import lease, store, sweep_state

    definition, trials = stored
    settings = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if o.startswith(RESUME_SETTINGS)}
    cell_overrides = [o for o in overrides if not o.startswith(RESUME_SETTINGS)]
    for key, value in settings.items():
        if not value.isdigit():
            raise ConfigError(key, value, "allowed: a positive integer")
        setattr(definition, key.rpartition(".")[2], int(value))
    definition.check("hydra.sweeper.")
    refused = [o for o in cell_overrides if o.startswith(("hydra", "sweep.", "experiment="))]
    if refused:
        raise ConfigError(refused[0].split("=")[0], refused[0].partition("=")[2], "allowed on resume: a trial's "
                          "plain overrides, cluster.*, tracking.uri, hydra.sweeper.n_trials and hydra.sweeper.n_jobs",
                          problem="the study's own settings are the stored ones")
    client = store.client(uri)
    state = sweep_state.load(uri, sweep_id, refresh=True)
    holder = lease.take(client, sweep_id, state.parent_run_id, address)  # one driver per sweep, before anything
    try:
        if state.sweep_status == "RUNNING":
            closed = sweep_state.close_open_runs(client, state, Status.FAILED, "driver lost: the sweep's driver died")
            print(f"sweep {sweep_id}: its driver is gone; closed {closed} open runs FAILED (driver lost)")
            state = sweep_state.load(uri, sweep_id, refresh=True)
        runs = {row.trial_key: row for row in state.trials}
        told = {r.trial_key for r in trials if r.state != "RUNNING"}  # the sweep reads a re-asked one's run itself
        metrics = {key: dict(client.get_run(row.run_id).data.metrics) for key, row in runs.items()
                   if key in told and row.status == Status.FINISHED.value and row.run_id}
        plan = sweep_state.stored_plan(client, state.parent_run_id)
        experiment = client.get_experiment(state.experiment_id).name
        if not _EXPERIMENT_NAME.fullmatch(experiment):
            raise ConfigError("experiment name", experiment[:100], "allowed: letters, digits, '_', '.', '-' (a sweep.name "
                              "this project's configs give)", problem="stored name is not taken from the store")
    except BaseException:
        lease.release(client, state.parent_run_id, holder)
        raise
    # The cells are composed from the stored overrides (checked as a command line is) and this one's.
    command = ["-m", "hydra/sweeper=optuna", f"sweep.id={sweep_id}", f"sweep.name={experiment}",
               f"tracking.uri={uri}", *(f"{k}={v}" for k, v in definition.fixed.items()), *cell_overrides]
    handed = Resume(definition, trials, {
        "reopen": state.parent_run_id, "holder": holder, "prior_rows": [dataclasses.asdict(t) for t in state.trials],
        "prior_plan": [dataclasses.asdict(c) for c in plan.trials] if plan else []},
        metrics, {key: row.status for key, row in runs.items()}, command, client)
    RESUMING.append(handed)
    return handed


def finish_resume(resume: Resume) -> None:
    """After the resumed study's `run`: release the lease where no step reopened the sweep (refused, or
    nothing left to ask); a reopened sweep's end has released it."""
    from orchestrator import lease

    RESUMING.clear()
    if not resume.opened:
        lease.release(resume.client, resume.sweep_arguments["reopen"], resume.sweep_arguments["holder"])


class StudySweeper(Sweeper):
    """Optuna's ask-and-tell over the launcher (the thin Hydra plugin subclass is in hydra_plugins/)."""

    def __init__(self, sampler: Any, objectives: Any, n_trials: int, n_jobs: int, max_failure_rate: float,
                 params: Optional[Any] = None) -> None:
        self.sampler, self.objectives, self.params = sampler, objectives, params
        self.n_trials, self.n_jobs, self.max_failure_rate = n_trials, n_jobs, max_failure_rate
        self.config: Optional[DictConfig] = None
        self.launcher = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def sweep(self, arguments: list[str]) -> None:
        with sweepers.private_sweep_dir(self.config):
            if self.sampler is None and not sweepers.optuna_plugin_installed():
                raise _install_hint()
            resume = RESUMING.pop() if RESUMING else None
            definition = resume.definition if resume else definition_from_config(self, arguments)
            if resume:  # the resuming command line's overrides (the stored ones among them), the last winning
                definition.fixed = _plain_overrides(arguments)
            Study(definition, self.launcher, resume).run()


def _plain_overrides(arguments: Sequence[str]) -> dict[str, str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = {}
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        if override.is_sweep_override():
            raise ConfigError(override.key_or_group, override.value(), "allowed on resume: plain key=value overrides "
                              "(the study's search space is the stored one)", problem="a sweep")
        out[override.key_or_group] = override.get_value_element_as_str()
    return out


class Study:
    """One study's loop: ask a batch, launch it, tell the results, record the study; to ``n_trials``."""

    def __init__(self, definition: Definition, launcher, resume: Optional[Resume] = None):
        optuna = _optuna()
        self.definition, self.launcher = definition, launcher
        self.distributions = _distributions(definition, "hydra.sweeper.params")
        self.study = optuna.create_study(directions=list(definition.objectives.values()),
                                         sampler=_sampler(definition))
        self.records: list[TrialRecord] = []
        self.resume = resume
        self.batch = 0
        self.warned: set[str] = set()
        self.replayed: list[TrialRecord] = []  # asked by a dead driver, not told: asked again first
        if resume is not None:
            self._replay(resume)

    def _replay(self, resume: Resume) -> None:
        """The stored trials back into a new study: told ones from their runs, the others asked again."""
        from optuna.trial import TrialState, create_trial

        for record in resume.trials:
            self.batch = max(self.batch, record.batch)
            if record.state == "RUNNING":
                self.replayed.append(record)
                continue
            # Told before: as its trial's latest run says now (a resubmission may have finished it since).
            values, reason = self._values(resume.statuses.get(record.trial_key, "FAILED"),
                                          resume.metrics.get(record.trial_key, {}), record.reason)
            self.study.add_trial(create_trial(
                state=TrialState.COMPLETE if values else TrialState.FAIL, values=values, params=record.params,
                distributions=self.distributions, system_attrs=record.system_attrs))
            self.records.append(TrialRecord(len(self.records), record.batch, record.params,
                                            "COMPLETE" if values else "FAIL", record.trial_key, values, reason,
                                            record.system_attrs))
        for record in self.replayed:
            self.study.enqueue_trial(record.params)
        print(f"study: {len(self.records)} trials back from the sweep's runs, {len(self.replayed)} asked again "
              f"(their driver died before they ended), {self.definition.n_trials - len(self.records)} to go",
              file=sys.stderr)
        self.launcher.begin_study(**resume.sweep_arguments)

    def run(self) -> None:
        d = self.definition
        if self.launcher.study is None:
            self.launcher.begin_study(cells=d.n_trials)
        try:
            while len(self.records) < d.n_trials:
                if not self._step(min(d.n_jobs, d.n_trials - len(self.records))):
                    break
        finally:
            if self.launcher.sweep is not None:
                self._say_front()
            if self.resume is not None:
                self.resume.opened = self.launcher.sweep is not None
            self.launcher.end_study()

    def _step(self, size: int) -> bool:
        """One batch; False when the study should stop (cancelled, too many failures, a plan only)."""
        from optuna.trial import TrialState

        self.batch += 1
        asked = [self.study.ask(self.distributions) for _ in range(size)]
        del self.replayed[:size]  # asked again first: Optuna hands out enqueued trials before new ones
        overrides = [self._overrides(trial.params) for trial in asked]
        batch = [TrialRecord(t.number, self.batch, dict(t.params), "RUNNING", system_attrs=_plain_attrs(t))
                 for t in asked]

        def before_step(keys: list[Optional[str]]) -> None:  # what a resume asks again if this driver dies now
            for record, key in zip(batch, keys):
                record.trial_key = key or ""
            self.launcher.sweep.tracker.write_study(study_json(self.definition, [*self.records, *batch,
                                                                                 *self._pending()]))

        self.launcher.before_step = before_step
        returns = self.launcher.launch(overrides, initial_job_idx=len(self.records))
        if not returns:  # hydra.launcher.plan_only: the first batch's plan was printed
            print(f"study: plan of its first batch ({size} of {self.definition.n_trials} trials; later ones depend "
                  f"on the results)", file=sys.stderr)
            return False
        failed = 0
        for trial, record, ret in zip(asked, batch, returns):
            result = ret.return_value
            record.trial_key = result["trial_key"]
            values, record.reason = self._values(result["status"], result["metrics"], result["reason"] or "")
            if values is None:
                failed += 1
                self.study.tell(trial, state=TrialState.FAIL)
            else:
                self.study.tell(trial, values)
            record.state, record.values = ("COMPLETE", values) if values else ("FAIL", None)
            record.system_attrs = _plain_attrs(self.study.trials[trial.number])
        self.records += batch
        self._record()
        if self.launcher.sweep.cancelled:
            return False
        if failed / len(batch) > self.definition.max_failure_rate:
            print(f"study: stopped after batch {self.batch}: {failed} of {len(batch)} trials did not finish, more than "
                  f"hydra.sweeper.max_failure_rate={self.definition.max_failure_rate:g}", file=sys.stderr)
            return False
        return True

    def _values(self, status: str, metrics: dict[str, float], reason: str) -> tuple[Optional[list[float]], str]:
        """A trial's objective values, or None and why it is told as failed."""
        if status != "FINISHED":
            return None, f"{status}: {reason}"[:300]
        values = []
        for metric in self.definition.objectives:
            value = metrics.get(metric)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                if metric not in self.warned:
                    self.warned.add(metric)
                    print(f"study: a finished trial has no finite {metric} (it has: {', '.join(sorted(metrics))[:300]});"
                          f" told to Optuna as failed", file=sys.stderr)
                return None, f"no finite {metric}"
            values.append(float(value))
        return values, ""

    def _overrides(self, params: dict[str, Any]) -> list[str]:
        fixed = {k: v for k, v in self.definition.fixed.items() if k not in params}
        return [*(f"{k}={v}" for k, v in fixed.items()), *(f"{k}={_override_value(v)}" for k, v in params.items())]

    def _record(self) -> None:
        """study.json and the study's progress on the parent run, after each batch."""
        from mlflow.entities import Metric

        from orchestrator import tracking

        tracker = self.launcher.sweep.tracker
        tracker.write_study(study_json(self.definition, [*self.records, *self._pending()]))
        complete = [r for r in self.records if r.state == "COMPLETE"]
        now, step = tracking.now_ms(), len(self.records)
        metrics = [Metric("study_trials", len(self.records), now, step),
                   Metric("study_pareto_size", len(pareto_front(self.definition, self.records)), now, step)]
        for i, (metric, direction) in enumerate(self.definition.objectives.items()):
            if complete:
                pick = min if direction == "minimize" else max
                metrics.append(Metric(f"study_best_{metric}", pick(r.values[i] for r in complete), now, step))
        tracker.writer.submit("record the study's progress", tracker.client.log_batch, tracker.parent_id, metrics)

    def _pending(self) -> list[TrialRecord]:
        """Trials a dead driver had asked that this one has not asked again yet: kept for the next resume."""
        return [TrialRecord(len(self.records) + i, r.batch, r.params, "RUNNING") for i, r in enumerate(self.replayed)]

    def _say_front(self) -> None:
        front = pareto_front(self.definition, self.records)
        if not front:
            return
        names = list(self.definition.objectives)
        print(f"study: {len(self.records)} trials in {self.batch} batches; Pareto front ({len(front)}):")
        for record in front:
            values = ", ".join(f"{n}={v:.6g}" for n, v in zip(names, record.values))
            params = " ".join(f"{k}={v}" for k, v in record.params.items())
            print(f"  #{record.number} {params}: {values}")


def _plain_attrs(trial) -> dict[str, Any]:
    """The sampler's system attributes, where plain JSON (NSGA-II's generation and parents)."""
    out = {}
    for key, value in trial.system_attrs.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


def _override_value(value: Any) -> str:
    """A sampled value as Hydra's override grammar reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def pareto_front(definition: Definition, records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """The completed trials no other completed trial dominates, one per trial key, in trial order."""
    signs = [1.0 if d == "minimize" else -1.0 for d in definition.objectives.values()]
    done = {}
    for r in records:
        if r.state == "COMPLETE" and r.values:
            done.setdefault(r.trial_key or str(r.number), r)
    points = list(done.values())

    def dominates(a: TrialRecord, b: TrialRecord) -> bool:
        pa = [s * v for s, v in zip(signs, a.values)]
        pb = [s * v for s, v in zip(signs, b.values)]
        return all(x <= y for x, y in zip(pa, pb)) and any(x < y for x, y in zip(pa, pb))

    return [p for p in points if not any(dominates(q, p) for q in points if q is not p)]


def table(definition: Definition, records: Sequence[TrialRecord], run_ids: dict[str, str]) -> list[dict[str, Any]]:
    """study.csv's lines: every Optuna trial in the order it was asked, its values, and whether it is on the front."""
    front = {id(r) for r in pareto_front(definition, records)}
    lines = []
    for r in records:
        line = {"number": r.number, "batch": r.batch, "state": r.state, "on_pareto_front": id(r) in front,
                "trial_key": r.trial_key, "run_id": run_ids.get(r.trial_key, ""), "reason": r.reason}
        line.update({f"param:{k}": v for k, v in r.params.items()})
        line.update({f"value:{m}": (r.values[i] if r.values else None) for i, m in enumerate(definition.objectives)})
        lines.append(line)
    return lines
