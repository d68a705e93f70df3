"""Hydra launcher that runs every cell of a multirun as a Ray task.

Hydra only instantiates launchers from the ``hydra_plugins`` namespace, so
``hydra_plugins/quantsweep_launcher`` holds a thin subclass of this one. The launcher
composes and validates *every* cell before submitting any, so a bad value anywhere in
the grid stops the sweep with nothing created.
"""

from __future__ import annotations

from typing import Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class RayTrialsLauncher(Launcher):
    def __init__(self, plan_only: bool = False) -> None:
        self.plan_only = plan_only
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # task_function is not used: a cell runs as jobs.trial.run on a worker, not in here.
        self.hydra_context, self.config = hydra_context, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from orchestrator import plan, sweep

        assert self.hydra_context is not None and self.config is not None
        cells = [self.hydra_context.config_loader.load_sweep_config(self.config, list(o)) for o in job_overrides]
        trials = [plan.planned_trial(cell, overrides) for cell, overrides in zip(cells, job_overrides)]
        settings = plan.sweep_settings(cells)
        if self.plan_only:
            plan.print_plan(trials)
            return []
        summary = sweep.execute(settings, trials)
        returns = []
        for cell, overrides in zip(cells, job_overrides):
            ret = JobReturn(overrides=list(overrides), cfg=cell, hydra_cfg=self.config,
                            task_name=self.config.hydra.job.name, status=JobStatus.COMPLETED)
            ret.return_value = summary
            returns.append(ret)
        return returns
