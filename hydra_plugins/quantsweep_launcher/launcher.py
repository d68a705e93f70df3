"""Hydra discovers launchers and sweepers only in the ``hydra_plugins`` namespace; the logic lives in
:mod:`orchestrator.launcher` and :mod:`orchestrator.study`. The launcher is selected by ``hydra/launcher:
ray_trials`` in conf/config.yaml; the sweepers' configs are in :mod:`orchestrator.sweepers`."""

from dataclasses import dataclass
from typing import Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore

from orchestrator.launcher import RayTrialsLauncher as _RayTrialsLauncher
from orchestrator.study import StudySweeper as _StudySweeper
from orchestrator.sweepers import private_sweep_dir


class RayTrialsLauncher(_RayTrialsLauncher):
    def __init__(self, plan_only: bool = False, plan_file: Optional[str] = None) -> None:
        super().__init__(plan_only, plan_file)


@dataclass
class RayTrialsLauncherConf:
    _target_: str = "hydra_plugins.quantsweep_launcher.launcher.RayTrialsLauncher"
    plan_only: bool = False  # compose and validate every cell, print the plan, run nothing
    plan_file: Optional[str] = None  # with plan_only: also write the plan.json the sweep would store, here


ConfigStore.instance().store(group="hydra/launcher", name="ray_trials", node=RayTrialsLauncherConf,
                             provider="quantsweep")


class TrialsSweeper(BasicSweeper):
    """Hydra's basic sweeper (the same grid syntax and ``hydra.sweeper.params``), minus its
    check that composes every cell once more before launching: our launcher composes and
    validates every cell itself, and a second full composition doubles a sweep's start. Its
    ``hydra.sweep.dir`` is private and temporary (orchestrator.sweepers.private_sweep_dir)."""

    def validate_batch_is_legal(self, batch) -> None:
        pass

    def sweep(self, arguments):
        with private_sweep_dir(self.config):
            return super().sweep(arguments)


class StudySweeper(_StudySweeper):
    """``hydra/sweeper=optuna``: Optuna's ask-and-tell over our launcher (``orchestrator/study.py``)."""
