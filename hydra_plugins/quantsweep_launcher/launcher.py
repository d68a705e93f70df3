"""Hydra discovers launchers only in the ``hydra_plugins`` namespace; the logic lives in
:mod:`orchestrator.launcher`. Selected by ``hydra/launcher: ray_trials`` in conf/config.yaml."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from orchestrator.launcher import RayTrialsLauncher as _RayTrialsLauncher


class RayTrialsLauncher(_RayTrialsLauncher):
    pass


@dataclass
class RayTrialsLauncherConf:
    _target_: str = "hydra_plugins.quantsweep_launcher.launcher.RayTrialsLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="ray_trials", node=RayTrialsLauncherConf,
                             provider="quantsweep")
