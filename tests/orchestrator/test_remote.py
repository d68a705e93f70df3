"""A real `mlflow server` and a real `ray start --head` on 127.0.0.1: results cross a server
(and survive its outage), and a sweep submitted as a Ray Job is followed and cancelled."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator import tracking
from tests.conftest import free_port
from tests.helpers import SUMMARY, sweep_runs, tag_values, wait_for

pytestmark = pytest.mark.slow
PASSWORD = "Pa55-w0rd-7f3a"


def test_results_cross_a_remote_server_and_wait_out_its_outage(ray_cluster, mlflow_server, cli_env, tmp_path):
    for _ in range(3):
        ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", "-m", "backend=noop", "backend.noop.sleep_s=3", "seed=1,2,3,4,5,6",
         "cluster.max_concurrent_trials=2", f"cluster.address={ray_cluster.address}",
         f"tracking.uri={mlflow_server.uri}"],
        cwd=tmp_path, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "FINISHED" in tag_values(mlflow_server.db, "status"), 120, "a first result landing")
        mlflow_server.stop()
        time.sleep(30)  # the other trials run and finish while the server is down
        assert driver.poll() is None, "the driver waits for the server"
        mlflow_server.start()
        out, err = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 0, err[-3000:]
    assert SUMMARY.search(out).groups()[1:] == ("6", "6", "0", "0", "0", "0"), out
    assert "store unreachable, retrying" in err

    client, parents, children = sweep_runs(mlflow_server.uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["trials_finished"] == 6
    assert len(children) == 6 and len({r.data.tags["trial_key"] for r in children}) == 6
    nodes = set()
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "FINISHED"
        assert run.data.params["backend.noop.sleep_s"] == "3.0" and run.data.metrics["slept_s"] == 3.0
        assert {"config.yaml", "trial.log"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        nodes.add(run.data.tags["ray_nodes"])
    assert len(nodes) >= 2, "trials ran on other nodes than the driver's, with no shared filesystem in between"


@pytest.fixture
def ray_head(tmp_path_factory, monkeypatch):
    """`ray start --head --block` on 127.0.0.1 in its own process group, stopped by that group's id.
    Ray's token authentication is on, as on a real cluster: clients send the token (RAY_AUTH_MODE=token).
    The token is this fixture's own, in RAY_AUTH_TOKEN: `ray start` creates none, and the user's
    ~/.ray/auth_token is not the tests' to read or write."""
    root = tmp_path_factory.mktemp("ray-head")
    ray_temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    dashboard = free_port()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={free_port()}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={ray_temp}"],
        cwd=root, env=env, stdout=open(root / "ray.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 without the token): it is up
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray head did not come up: {(root / 'ray.log').read_text()[-3000:]}")
                time.sleep(1)
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:  # `ray start --block` took 39 s to stop its processes: the head is the test's own, stop it
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(ray_temp, ignore_errors=True)


def _job_details(address: str, env: dict, job_id: str) -> str:
    """Everything Ray holds of a job (entrypoint, metadata, runtime env), as JSON text."""
    code = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(C(sys.argv[1]).get_job_info(sys.argv[2]).model_dump_json())")
    proc = subprocess.run([sys.executable, "-c", code, address, job_id], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _jobs(address: str, env: dict) -> dict[str, str]:
    """submission id -> status, asked in a fresh process: Ray reads RAY_AUTH_MODE once per process."""
    code = ("import json, sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(json.dumps({j.submission_id: str(j.status.value) for j in C(sys.argv[1]).list_jobs()}))")
    proc = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_submit_status_and_cancel_a_sweep_running_as_a_ray_job(ray_head, mlflow_server, run_cli, cli_env):
    cli_env["RAY_AUTH_MODE"] = "token"
    # Credentials in the URI stay on this machine: the job writes with the cluster's own (none here).
    store = f"tracking.uri=http://quant:{PASSWORD}@{mlflow_server.uri.split('://', 1)[1]}"
    bad = run_cli("submit", "--address", ray_head, "--", "run", "-m", "dtype=int5", store)
    assert bad.returncode == 2 and "dtype=int5: no such dtype config" in bad.stderr
    assert _jobs(ray_head, cli_env) == {}, "a bad config submits nothing"

    submitted = run_cli("submit", "--address", ray_head, "--", "run", "-m", "backend=noop", "backend.noop.sleep_s=600",
                        "seed=1,2", store)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    sweep_id = submitted.stdout.strip().splitlines()[-1]
    assert sweep_id.startswith("swp-")
    assert PASSWORD not in submitted.stdout + submitted.stderr
    job = _job_details(ray_head, cli_env, f"quantsweep-{sweep_id}")
    assert PASSWORD not in job and f"tracking.uri={mlflow_server.uri}" in job, job

    def running() -> bool:
        state = json.loads(run_cli("status", sweep_id, "--json", store).stdout or "{}")
        return state.get("counts", {}).get("RUNNING") == 2
    wait_for(running, 180, "both trials running on the cluster")
    table = run_cli("status", sweep_id, store, "--address", ray_head)  # never an address from the store
    assert f"ray job quantsweep-{sweep_id}: RUNNING" in table.stdout, table.stdout + table.stderr
    assert "ray job" not in run_cli("status", sweep_id, store).stdout

    cancelled = run_cli("cancel", sweep_id, store, "--address", ray_head)
    assert cancelled.returncode == 0, cancelled.stderr[-3000:]
    assert f"sweep {sweep_id}: killed (2 cancelled)" in cancelled.stdout
    _, parents, children = sweep_runs(mlflow_server.uri)
    assert parents[0].info.status == "KILLED" and parents[0].data.tags["ray_job_submission_id"] == f"quantsweep-{sweep_id}"
    # The job's working dir has no .git: the code's version travelled with the submission.
    assert parents[0].data.tags["git_sha"] == tracking.code_version()["git_sha"] != "unknown"
    assert all(r.info.status == "KILLED" and r.data.tags["status"] == "CANCELLED" for r in children)
    wait_for(lambda: _jobs(ray_head, cli_env)[f"quantsweep-{sweep_id}"] in ("STOPPED", "SUCCEEDED", "FAILED"), 60,
              "the job ending")
