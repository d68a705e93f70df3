"""The Hydra config nodes of our two sweepers, registered under Hydra's own names.

``hydra/sweeper=basic`` (Hydra's default) is our grid sweeper and ``hydra/sweeper=optuna`` our adaptive one
(orchestrator/study.py); both classes are thin subclasses in ``hydra_plugins/quantsweep_launcher``, which
Hydra requires. A leaf: this module imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeperConf
from omegaconf import MISSING, DictConfig, open_dict


def optuna_plugin_installed() -> bool:
    """Whether the `optuna` extra (Hydra's Optuna sweeper plugin, its sampler configs) is installed."""
    return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None


@contextlib.contextmanager
def private_sweep_dir(config: DictConfig) -> Iterator[str]:
    """Hydra saves the sweep's whole config (every override, a tracking password included) as
    ``multirun.yaml`` in ``hydra.sweep.dir``; everything else goes to MLflow. So that folder is a private
    temporary one (mode 0700), removed when the sweep ends."""
    folder = tempfile.mkdtemp(prefix="quantsweep-hydra-")
    with open_dict(config):
        config.hydra.sweep.dir = folder
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class TrialsSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.quantsweep_launcher.launcher.TrialsSweeper"


@dataclass
class StudySweeperConf:
    """``hydra/sweeper=optuna``: Hydra's Optuna sweeper's options (its ``hydra/sweeper/sampler`` group,
    ``n_trials``, ``n_jobs``, ``params``, ``max_failure_rate``), with the objectives named as metrics
    instead of ``direction``. The study's name is the sweep id and its storage the sweep's MLflow runs, so
    ``storage`` and ``study_name`` are not options."""
    _target_: str = "hydra_plugins.quantsweep_launcher.launcher.StudySweeper"
    _recursive_: bool = False  # the sampler is built by orchestrator.study, from a list of known ones
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}] if optuna_plugin_installed() else [])
    sampler: Any = field(default_factory=lambda: MISSING if optuna_plugin_installed() else None)  # the group's choice
    # Metric name -> minimize or maximize, in order (e.g. {kl_divergence: minimize, bits_per_element: minimize}).
    objectives: Any = None
    n_trials: int = 20   # the study's trials in all, a resumed study's included
    n_jobs: int = 2      # trials per batch: one launch of the Ray launcher, run in parallel
    # Stop asking once more than this fraction of a batch's trials did not finish (1.0: never stop).
    max_failure_rate: float = 1.0
    params: Optional[dict[str, str]] = None  # the search space in Hydra's sweep syntax: dtype: choice(int4,int8)


def register() -> None:
    """Our sweepers under Hydra's names: ``optuna`` in place of the plugin's node (whose sweeper expects
    each job to return its objective as a number), and ``basic``, Hydra's default, as our grid sweeper
    (so an experiment's ``override /hydra/sweeper: optuna`` has no other override to lose to); ``trials``,
    its earlier name, too. Hydra's plugin scan runs each plugin module again, and each stores its nodes:
    so the scan is made first, and ours stored after it."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()
    store = ConfigStore.instance().store
    store(group="hydra/sweeper", name="optuna", node=StudySweeperConf, provider="quantsweep")
    for name in ("basic", "trials"):
        store(group="hydra/sweeper", name=name, node=TrialsSweeperConf, provider="quantsweep")
