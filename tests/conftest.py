"""Shared fixtures: one tiny model built per test session, in a private cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; the variable must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A QUANTSWEEP_CACHE for the session; the tiny model is built there once and reused."""
    cache = tmp_path_factory.mktemp("quantsweep-cache")
    os.environ["QUANTSWEEP_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_cfg(model_cache) -> dict:
    """The model section of the default config (model=tiny-llama), built into the cache."""
    from omegaconf import OmegaConf

    from jobs.models import ensure_built
    from orchestrator.plan import trial_config
    from tests.helpers import compose

    cfg = compose()
    ensure_built(OmegaConf.to_container(cfg.model.build))
    return trial_config(cfg)["model"]


@pytest.fixture
def cli_env(model_cache) -> dict:
    """Environment for the CLI under test: the session's model cache, Ray on 127.0.0.1."""
    env = {**os.environ, "QUANTSWEEP_CACHE": str(model_cache), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the store must be the working directory's
    return env


@pytest.fixture
def run_cli(tmp_path, cli_env):
    """Run the real `orchestrator` command in a fresh working directory."""

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=tmp_path, env=cli_env,
                              capture_output=True, text=True, timeout=timeout)

    return run
