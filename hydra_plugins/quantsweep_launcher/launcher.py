"""Hydra discovers launchers only in the ``hydra_plugins`` namespace; the logic lives in
:mod:`orchestrator.launcher`. Selected by ``hydra/launcher: ray_trials`` in conf/config.yaml."""

import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore
from omegaconf import open_dict

from orchestrator.launcher import RayTrialsLauncher as _RayTrialsLauncher
from orchestrator.study import StudySweeper as _StudySweeper


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
    validates every cell itself, and a second full composition doubles a sweep's start.

    Hydra saves the sweep's whole config (every override, a tracking password included) as
    ``multirun.yaml`` in ``hydra.sweep.dir``; everything else goes to MLflow. So that folder
    is a private temporary one (mode 0700), removed when the sweep ends."""

    def validate_batch_is_legal(self, batch) -> None:
        pass

    def sweep(self, arguments):
        folder = tempfile.mkdtemp(prefix="quantsweep-hydra-")
        with open_dict(self.config):
            self.config.hydra.sweep.dir = folder
        try:
            return super().sweep(arguments)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@dataclass
class TrialsSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.quantsweep_launcher.launcher.TrialsSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="trials", node=TrialsSweeperConf, provider="quantsweep")


class StudySweeper(_StudySweeper):
    """``hydra/sweeper=optuna``: Optuna's ask-and-tell over our launcher (``orchestrator/study.py``, which
    registers its config)."""
