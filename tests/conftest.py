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
# Every Ray node the tests start binds to 127.0.0.1; Ray reads this when it is imported.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """The QUANTSWEEP_CACHE the tests build the tiny model in. In CI a fresh one per session, so the
    build runs as on a new machine; elsewhere $QUANTSWEEP_TEST_CACHE (default
    ~/.cache/quantsweep-tests), so the build (~2 minutes on 2 cores) is paid once per machine, not
    once per `pytest -m "not slow"`. Builds are keyed by their config's hash and locked, as in use."""
    if os.environ.get("CI") == "true":
        cache = tmp_path_factory.mktemp("quantsweep-cache")
    else:
        cache = Path(os.environ.get("QUANTSWEEP_TEST_CACHE", Path.home() / ".cache" / "quantsweep-tests"))
        cache.mkdir(parents=True, exist_ok=True)
    os.environ["QUANTSWEEP_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_cfg(model_cache) -> dict:
    """The model section of the default config (model=tiny-llama), built into the cache."""
    from jobs.config import TrialConfig
    from jobs.models import ensure_built
    from orchestrator.plan import trial_config
    from tests.helpers import compose

    config = trial_config(compose())
    ensure_built(TrialConfig.from_dict(config).model.build)
    return config["model"]


@pytest.fixture
def cli_env(model_cache) -> dict:
    """Environment for the CLI under test: the session's model cache, Ray on 127.0.0.1."""
    env = {**os.environ, "QUANTSWEEP_CACHE": str(model_cache)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the store must be the working directory's
    return env


@pytest.fixture
def run_cli(tmp_path, cli_env):
    """Run the real `orchestrator` command in a fresh working directory."""

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=tmp_path, env=cli_env,
                              capture_output=True, text=True, timeout=timeout)

    return run


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """A real multi-node Ray cluster on 127.0.0.1 (ray.cluster_utils.Cluster); the head holds
    no CPUs, so trials land on the worker nodes the test adds with ``add_node``."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    assert cluster.address.startswith("127.0.0.1:"), cluster.address
    yield cluster
    cluster.shutdown()


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a sqlite store; stop() and start() again on
    the same port and store, to play an outage."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = root / "server.db"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        import time
        import urllib.request

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination", str(self.root / "artifacts"),
             "--workers", "1"],
            cwd=self.root, stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not come up")

    def stop(self) -> None:
        """Stop the server and the workers it started: its own process group, by id."""
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def _served(root: Path):
    server = MlflowServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(tmp_path_factory):
    yield from _served(tmp_path_factory.mktemp("mlflow-server"))


@pytest.fixture(scope="module")
def shared_mlflow_server(tmp_path_factory):
    """One server for a module's tests that each make their own sweep and look only at it (a
    server takes ~12 s to start)."""
    yield from _served(tmp_path_factory.mktemp("mlflow-server"))
