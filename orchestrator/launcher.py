"""Hydra launcher that runs every cell of a multirun as a Ray task.

Hydra only instantiates launchers from the ``hydra_plugins`` namespace, so
``hydra_plugins/quantsweep_launcher`` holds a thin subclass of this one. The launcher
composes and validates *every* cell before submitting any, so a bad value anywhere in
the grid stops the sweep with nothing created.

Composing a cell from scratch costs Hydra ~150 ms here, which on a 10,000-cell sweep is
half an hour. Cells that pick the same config-group options share one composition; their
value overrides (``seed=3``, ``bench.batch_size=8``) are then applied as Hydra applies them
after composing the defaults (:class:`_Combination`), and each cell goes on as plain data.
"""

from __future__ import annotations

import pickle
import re
from typing import Any, Callable, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import Container, DictConfig, OmegaConf, open_dict

from orchestrator.errors import ConfigError


class RayTrialsLauncher(Launcher):
    """Each launch runs its cells as one sweep and returns, per cell, its trial's outcome (:func:`outcome`).
    After :meth:`begin_study` every launch is one step (batch) of a single sweep that stays open until
    :meth:`end_study`: how Optuna's ask-and-tell drives it (orchestrator.study)."""

    def __init__(self, plan_only: bool = False, plan_file: Optional[str] = None) -> None:
        self.plan_only, self.plan_file = plan_only, plan_file
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.study: Optional[dict[str, Any]] = None  # begin_study's arguments for the sweep, once it is called
        self.sweep = None  # the study's open orchestrator.sweep.Sweep, from its first launch
        self.before_step: Optional[Callable[[list], None]] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # task_function is not used: a cell runs as jobs.trial.run on a worker, not in here.
        self.hydra_context, self.config = hydra_context, config

    def _compose(self, job_overrides: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
        """Each cell's resolved config as plain data (Hydra's own ``hydra`` node left out)."""
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.core.override_parser.types import Override

        assert self.hydra_context is not None and self.config is not None
        loader = self.hydra_context.config_loader
        parser = OverridesParser.create()
        combinations: dict[tuple[str, ...], _Combination] = {}
        parsed_once: dict[str, tuple[Override, bool]] = {}  # most overrides recur in many cells: parse each once
        groups_by_key: dict[str, bool] = {}
        cells = []
        for overrides in job_overrides:
            for text in overrides:
                if text not in parsed_once:
                    override = _number_override(text) or parser.parse_overrides([text])[0]
                    key = override.key_or_group
                    if key not in groups_by_key:
                        groups_by_key[key] = loader.repository.group_exists(key)
                    parsed_once[text] = override, override.package is not None or groups_by_key[key]
            parsed, is_group = zip(*(parsed_once[text] for text in overrides)) if overrides else ((), ())
            groups = tuple(o.input_line for o, g in zip(parsed, is_group) if g)
            if groups not in combinations:
                base = loader.load_sweep_config(self.config, list(groups))
                with open_dict(base):
                    del base["hydra"]  # the launcher's own config, the same for every cell
                combinations[groups] = _Combination(base)
            values = [o for o, g in zip(parsed, is_group) if not g]
            cells.append(combinations[groups].cell(values, ConfigLoaderImpl._apply_overrides_to_config))
        return cells

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from orchestrator import plan, sensitivity, sweep

        assert self.hydra_context is not None and self.config is not None
        plan.forget_checks()  # conf files and the working directory may have changed since the last plan
        cells = self._compose(job_overrides)
        settings = plan.sweep_settings(cells)
        if self.study is not None:
            return self._launch_step(settings, cells, job_overrides)
        expanded = sensitivity.expand(cells, job_overrides)  # a sensitivity sweep's probes: cells of their own
        trials = [plan.planned_trial(cell, overrides) for cell, overrides in zip(*expanded)]
        if self.plan_only:
            plan.print_plan(trials)
            if self.plan_file:
                from pathlib import Path

                from orchestrator import tracking

                Path(self.plan_file).write_text(tracking.plan_json([tracking.plan_cell(t.spec) for t in trials],
                                                                   OmegaConf.to_container(settings, resolve=True)))
            return []
        results = sweep.execute(settings, trials).results
        # Each cell's own trial: a sensitivity sweep's probes follow the cell they were made from.
        given = iter(enumerate(map(tuple, job_overrides)))
        position, own = next(given, (None, None)), {}
        for trial, overrides in zip(trials, expanded[1]):
            if overrides == position[1]:
                own[position[0]] = trial.spec.trial_key
                position = next(given, (None, None))
        return [self._job_return(overrides, outcome(results[own[i]])) for i, overrides in enumerate(job_overrides)]

    def _launch_step(self, settings: DictConfig, cells: list, job_overrides: Sequence[Sequence[str]]) -> list[JobReturn]:
        """A study's batch. A cell the plan refuses (a sampled value out of range, a combination a method
        cannot take) is a failed point of the search, not bad input, once the study runs: it is returned
        REFUSED with the reason and not run. A first batch with no cell to run raises the first refusal."""
        from orchestrator import plan, sweep

        if settings.sweep.sensitivity.groups != "none":
            raise ConfigError("sweep.sensitivity.groups", settings.sweep.sensitivity.groups,
                              "allowed with hydra/sweeper=optuna: none", problem="a sensitivity sweep is a grid")
        planned: list[Any] = []
        for cell, overrides in zip(cells, job_overrides):
            try:
                planned.append(plan.planned_trial(cell, overrides))
            except ConfigError as error:
                planned.append(error)
        trials = [t for t in planned if not isinstance(t, ConfigError)]
        if self.plan_only:
            plan.print_plan(trials)
            return []
        if self.sweep is None:
            if not trials:
                raise planned[0]
            self.sweep = sweep.Sweep(settings, study=True, **self.study)
        keys = [None if isinstance(t, ConfigError) else t.spec.trial_key for t in planned]
        if self.before_step is not None:
            self.before_step(keys)
        results = self.sweep.run(trials) if trials else {}
        return [self._job_return(overrides, outcome(results[key]) if key else
                                 {"trial_key": "", "status": "REFUSED", "reason": str(t), "metrics": {}})
                for overrides, key, t in zip(job_overrides, keys, planned)]

    def _job_return(self, overrides: Sequence[str], value: dict[str, Any]) -> JobReturn:
        ret = JobReturn(overrides=list(overrides), hydra_cfg=self.config, task_name=self.config.hydra.job.name,
                        status=JobStatus.COMPLETED)
        ret.return_value = value
        return ret

    def begin_study(self, before_step: Optional[Callable[[list], None]] = None, **sweep_arguments: Any) -> None:
        """From now on every launch is a step of one sweep, opened by the first with ``sweep_arguments``
        (orchestrator.sweep.Sweep's: an earlier sweep to reopen, its rows, plan and lease). ``before_step``
        is called with each cell's trial key (None where refused) once the step is planned and its sweep
        open, before any of its trials runs."""
        self.study, self.before_step = sweep_arguments, before_step

    def end_study(self):
        """End the study's sweep (its report and summary line); its SweepSummary, or None if no step ran."""
        return None if self.sweep is None else self.sweep.end()


def outcome(result) -> dict[str, Any]:
    """A cell's JobReturn value: how its trial ended and its metrics, as plain data. The Hydra job (the
    cell's launch) completed even where the trial failed: the failure is a recorded result, not a crash
    (Hydra's basic sweeper raises a failed job's error once the whole sweep has run)."""
    return {"trial_key": result.trial_key, "status": result.status.value, "reason": result.reason,
            "metrics": dict(result.metrics)}


class _Combination:
    """The cells that pick one combination of config groups: composed by Hydra once, each cell's value
    overrides (``seed=3``, ``bench.batch_size=8``) then applied as Hydra applies them after composing.

    Where nothing in the composition interpolates, a value override changes its own key and nothing
    else: it is applied once to a scratch copy (Hydra's conversion and type checks) and its value set
    into a copy of the resolved base that shares every untouched section with it. So a cell costs what
    its values cost, not a config copy. Other overrides (``+key``, ``~key``, a dict merged into a dict,
    an interpolation) take the general path: a copy of the composed config, resolved."""

    def __init__(self, base: DictConfig) -> None:
        self.pickled = pickle.dumps(base)  # unpickling copies a config in a third of deepcopy's time
        self.plain = OmegaConf.to_container(base, resolve=True)
        self.interpolates = "${" in OmegaConf.to_yaml(base)
        # One scratch copy per key: an override is checked against the composition with no other key changed.
        self.scratch: dict[str, DictConfig] = {}
        self.values: dict[str, tuple[list[str], Any]] = {}  # override text -> (its key's path, its value)

    def cell(self, overrides: list, apply: Callable[[list, DictConfig], None]) -> dict[str, Any]:
        if not overrides:
            return self.plain  # shared: cells are only read from here on
        if not self.interpolates and all(self._is_plain_value(o) for o in overrides) and _apart(overrides):
            cell = dict(self.plain)
            if all(_set_path(cell, *self._value(o, apply)) for o in overrides):
                return cell
        cell = pickle.loads(self.pickled)
        apply(overrides, cell)
        return OmegaConf.to_container(cell, resolve=True)

    def _value(self, override, apply: Callable[[list, DictConfig], None]) -> tuple[list[str], Any]:
        """(the path of its key, the value it sets there), converted and checked by Hydra once per override."""
        if override.input_line not in self.values:
            key = override.key_or_group
            if key not in self.scratch:
                self.scratch[key] = pickle.loads(self.pickled)
            apply([override], self.scratch[key])
            value = OmegaConf.select(self.scratch[key], key)
            plain = OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value
            self.values[override.input_line] = key.split("."), plain
        return self.values[override.input_line]

    @staticmethod
    def _is_plain_value(override) -> bool:
        """A change of an existing key to a value that neither merges into a dict, interpolates nor is missing."""
        if override.is_delete() or override.is_add() or override.is_force_add() or "$" in (override.input_line or "$"):
            return False
        value = override.value()
        return not isinstance(value, dict) and value != "???"


# ``key=<number>`` in the canonical form Hydra's grammar reads as an int or a float (``seed=17``,
# ``method.smoothquant.alpha=0.5``): a range sweep's cells, thousands of them. Hydra's parser takes
# ~0.25 ms an override; these are read here as it reads them (tests/orchestrator/test_launcher.py).
_NUMBER_OVERRIDE = re.compile(r"(?P<key>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)"
                              r"=(?P<value>-?(?:0|[1-9][0-9]*)(?P<fraction>\.[0-9]+)?)", re.ASCII)


def _number_override(text: str):
    """Hydra's parse of ``text`` where it is a plain ``key=<number>``, else None."""
    from hydra.core.override_parser.types import Override, OverrideType, ValueType

    found = _NUMBER_OVERRIDE.fullmatch(text)
    if found is None:
        return None
    value = float(found["value"]) if found["fraction"] else int(found["value"])
    return Override(type=OverrideType.CHANGE, key_or_group=found["key"], value_type=ValueType.ELEMENT, _value=value,
                    input_line=text)


def _apart(overrides: list) -> bool:
    """No override's key is another's or lies under it: each then sets its own value, whatever the order."""
    keys = sorted(o.key_or_group + "." for o in overrides)
    return all(not b.startswith(a) for a, b in zip(keys, keys[1:]))


def _set_path(cell: dict[str, Any], path: list[str], value: Any) -> bool:
    """Set ``value`` at ``path`` of ``cell``, copying the dicts along the path (they are shared with the
    base); False where the path does not run through dicts to an existing key."""
    node = cell
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            return False
        node[part] = node = dict(child)
    if path[-1] not in node:
        return False
    node[path[-1]] = value
    return True
