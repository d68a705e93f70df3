"""Credentials in a tracking URI reach MLflow's client and nothing else."""

import os

import pytest

from orchestrator import credentials, store
from tests.helpers import SUMMARY

PASSWORD = "Pa55-w0rd-7f3a"


@pytest.mark.parametrize("text,masked", [
    ("http://user:pw@host:5000", "http://user:***@host:5000"),
    ("tracking.uri=https://tok3n@mlflow.example/x?a=1", "tracking.uri=https://***@mlflow.example/x?a=1"),
    ("orchestrator run tracking.uri=http://u:p@h:1 seed=1", "orchestrator run tracking.uri=http://u:***@h:1 seed=1"),
    ("s3://bucket/key?X-Amz-Signature=abc&token=t0k", "s3://bucket/key?X-Amz-Signature=***&token=***"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("dtype=int4 seed=1", "dtype=int4 seed=1"),
])
def test_mask_hides_userinfo_and_secret_query_values(text, masked):
    assert credentials.mask(text) == masked


def test_a_uri_gives_its_credentials_to_mlflows_environment_only(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert store.resolve_uri(f"http://quant:{PASSWORD}@127.0.0.1:5000/") == "http://127.0.0.1:5000/"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "quant" and os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD
    assert store.resolve_uri("http://[::1]:5000") == "http://[::1]:5000"


@pytest.mark.slow
def test_a_password_in_the_tracking_uri_appears_nowhere(mlflow_server, run_cli, cli_env, tmp_path_factory):
    private_tmp = tmp_path_factory.mktemp("tmp")
    cli_env["TMPDIR"] = str(private_tmp)  # where Hydra's multirun.yaml would be left
    host = mlflow_server.uri.split("://", 1)[1]
    store = f"tracking.uri=http://quant:{PASSWORD}@{host}"
    outputs = [run_cli("run", "-m", "backend=noop", "seed=1,2", "backend.noop.allocate_gb=0,1000000", store)]
    sweep_id = SUMMARY.search(outputs[0].stdout).group(1)
    outputs += [run_cli("status", sweep_id, store),
                run_cli("resubmit", sweep_id, "--failed", "backend.noop.allocate_gb=0", store),
                run_cli("run", "backend=noop", "tracking.uri=http://quant:" + PASSWORD + "@127.0.0.1:1")]
    assert [p.returncode for p in outputs] == [1, 0, 0, 2], [p.stderr[-2000:] for p in outputs]
    for proc in outputs:
        assert PASSWORD not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    mlflow_server.stop()  # the store's files complete
    stored = [p for p in mlflow_server.root.rglob("*") if p.is_file() and p.name != "server.log"]
    assert any(p.name.startswith("server.db") for p in stored) and any(p.name == "plan.json" for p in stored)
    leaked = [p for p in stored if PASSWORD.encode() in p.read_bytes()]
    assert leaked == [], f"the password is stored in {leaked}"
    assert [p for p in private_tmp.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()] == []
    assert not list(private_tmp.glob("quantsweep-hydra-*")), "Hydra's sweep folder is removed"
