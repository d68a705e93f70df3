"""Resubmission and resume into the same sweep, through a real `mlflow server`, with real Ray.

Failures are real too: ``backend.noop.allocate_gb=1000000`` makes a no-op trial fail with an
out-of-memory error, and the fixing override ``backend.noop.allocate_gb=0`` is what a user
would pass to dodge an OOM.
"""

import json
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from tests.orchestrator.test_remote import _sweep_runs
from tests.orchestrator.test_scheduling import SUMMARY, _tag_values, _wait_for

pytestmark = pytest.mark.slow


def _by_key(uri: str):
    client, parents, children = _sweep_runs(uri)
    runs: dict[str, list] = {}
    for run in children:
        runs.setdefault(run.data.tags["trial_key"], []).append(run)
    return client, parents, runs


def test_resubmit_failed_with_a_fixing_override(mlflow_server, run_cli):
    store = f"tracking.uri={mlflow_server.uri}"
    first = run_cli("run", "-m", "backend=noop", "seed=1,2", "backend.noop.allocate_gb=0,1000000", store)
    assert first.returncode == 1, first.stderr[-3000:]
    sweep_id = SUMMARY.search(first.stdout).group(1)

    again = run_cli("resubmit", sweep_id, "--failed", "backend.noop.allocate_gb=0", store)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 trials already have a FINISHED attempt: not re-run" in again.stdout
    assert SUMMARY.search(again.stdout).groups() == (sweep_id, "2", "2", "0", "0", "0", "0"), again.stdout
    assert f"sweep {sweep_id} now: 4 trials (4 finished)" in again.stdout

    _, parents, runs = _by_key(mlflow_server.uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["trials_finished"] == 4 and parents[0].data.metrics["trials_failed"] == 0
    assert len(runs) == 4
    for attempts in runs.values():
        assert Counter(r.data.tags["status"] for r in attempts)["FINISHED"] == 1, "one FINISHED attempt per key"
        numbers = sorted(int(r.data.tags["attempt"]) for r in attempts)
        assert numbers == list(range(1, len(attempts) + 1))
        if len(attempts) == 2:
            first_try, second_try = sorted(attempts, key=lambda r: r.data.tags["attempt"])
            assert first_try.data.tags["reason"].startswith("out of memory")
            assert second_try.data.tags["resubmit_overrides"] == "backend.noop.allocate_gb=0"
            assert second_try.data.params["backend.noop.allocate_gb"] == "0.0"
            assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in attempts)

    nothing = run_cli("resubmit", sweep_id, "--failed", store)
    assert nothing.returncode == 0 and f"sweep {sweep_id}: nothing to re-run" in nothing.stdout


def test_resume_after_the_driver_was_killed(mlflow_server, cli_env, tmp_path, run_cli):
    store = f"tracking.uri={mlflow_server.uri}"
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", "-m", "backend=noop", "backend.noop.sleep_s=4",
                               "seed=1,2,3,4,5", "cluster.max_concurrent_trials=2", store],
                              cwd=tmp_path, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: {"FINISHED", "RUNNING"} <= set(_tag_values(mlflow_server.db, "status")), 120,
                  "a first trial finished and a later one running")
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        driver.kill()
    sweep_id = _tag_values(mlflow_server.db, "sweep_id")[0]
    with sqlite3.connect(f"file:{mlflow_server.db}?mode=ro", uri=True) as conn:
        left_open = conn.execute("SELECT count(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]
    assert left_open > 1, "the killed driver left its parent run and unfinished trials open"
    # Runs are made when trials start: the cells not started have none, and only the sweep's plan
    # knows them. One more, as if its start had never been written.
    client, _, runs = _by_key(mlflow_server.uri)
    unmade = next(r for attempts in runs.values() for r in attempts if r.data.tags["status"] != "FINISHED")
    client.delete_run(unmade.info.run_id)
    without_run = 5 - (len(runs) - 1)

    resumed = run_cli("resume", sweep_id, store)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"sweep {sweep_id}: its driver is gone; closed" in resumed.stdout
    assert f"{without_run} planned trials have no run (the driver died before making them): run as attempt 1" \
        in resumed.stdout
    assert f"sweep {sweep_id} now: 5 trials (5 finished)" in resumed.stdout

    _, parents, runs = _by_key(mlflow_server.uri)
    assert len(runs) == 5 and parents[0].info.status == "FINISHED"
    for attempts in runs.values():
        assert [r.data.tags["status"] for r in attempts].count("FINISHED") == 1
        assert all(r.info.status != "RUNNING" for r in attempts)
        for stale in (r for r in attempts if r.data.tags["status"] != "FINISHED"):
            assert stale.data.tags["reason"] == "driver lost: the sweep's driver died"

    state = json.loads(run_cli("status", sweep_id, "--json", store).stdout)
    assert state["counts"] == {"FINISHED": 5}


@pytest.mark.parametrize("tamper,message", [
    ({"seed": 0, "bogus": 1}, "stored config has unexpected contents"),
    ({"kernel": {"name": "torch", "_target_": "os.system"}}, "kernel._target_=os.system"),
    ({"bench": {"batch_size": -4}}, "bench.batch_size=-4: invalid value; allowed: >= 1"),
    ({"dtype": {"name": "x", "format": "int4", "group_size": "lots"}}, "dtype.group_size"),
])
def test_a_tampered_stored_config_is_refused_and_nothing_runs(shared_mlflow_server, run_cli, tamper, message):
    import yaml
    from mlflow.tracking import MlflowClient

    store = f"tracking.uri={shared_mlflow_server.uri}"
    first = run_cli("run", "backend=noop", "backend.noop.allocate_gb=1000000", store)
    sweep_id = SUMMARY.search(first.stdout).group(1)
    client, _, runs = _by_key(shared_mlflow_server.uri)
    [run] = [r for attempts in runs.values() for r in attempts if r.data.tags["sweep_id"] == sweep_id]
    with tempfile.TemporaryDirectory() as tmp:
        config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", tmp)).read_text())
    for key, value in tamper.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    MlflowClient(shared_mlflow_server.uri).log_text(run.info.run_id, yaml.safe_dump(config), "config.yaml")

    refused = run_cli("resubmit", sweep_id, "--failed", "backend.noop.allocate_gb=0", store)
    assert refused.returncode == 2, refused.stdout + refused.stderr[-3000:]
    assert refused.stderr.startswith("orchestrator: error: ") and message in refused.stderr, refused.stderr
    _, _, after = _by_key(shared_mlflow_server.uri)
    assert sum(len(a) for a in after.values()) == sum(len(a) for a in runs.values()), "nothing was submitted"


@pytest.mark.parametrize("tag,value,message", [
    ("trial_key", "x' OR tags.kind != '", "trial_key tag of run"),
    ("attempt", "two", "attempt tag of run"),
])
def test_a_tampered_stored_tag_is_refused_and_nothing_runs(shared_mlflow_server, run_cli, tag, value, message):
    from mlflow.tracking import MlflowClient

    store = f"tracking.uri={shared_mlflow_server.uri}"
    sweep_id = SUMMARY.search(run_cli("run", "backend=noop", "backend.noop.allocate_gb=1000000", store).stdout).group(1)
    _, _, runs = _by_key(shared_mlflow_server.uri)
    [run] = [r for attempts in runs.values() for r in attempts if r.data.tags["sweep_id"] == sweep_id]
    MlflowClient(shared_mlflow_server.uri).set_tag(run.info.run_id, tag, value)
    refused = run_cli("resubmit", sweep_id, "--failed", store)
    assert refused.returncode == 2 and message in refused.stderr, refused.stderr[-3000:]
    _, _, after = _by_key(shared_mlflow_server.uri)
    assert sum(len(a) for a in after.values()) == sum(len(a) for a in runs.values()), "nothing was submitted"


def test_sweep_reuse_takes_finished_cells_from_earlier_sweeps(run_cli, tmp_path):
    first = run_cli("run", "-m", "backend=noop", "seed=1,2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli("run", "-m", "backend=noop", "seed=1,2,3", "sweep.reuse=true")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "sweep.reuse=true: 2 of 3 trials taken from earlier sweeps, 1 to run" in second.stderr
    _, parents, runs = _by_key(f"sqlite:///{tmp_path / 'mlflow.db'}")
    new_sweep = SUMMARY.search(second.stdout).group(1)
    reused = [r for a in runs.values() for r in a if r.data.tags["sweep_id"] == new_sweep and "reused_from" in r.data.tags]
    assert len(reused) == 2 and all(r.data.tags["status"] == "FINISHED" and r.data.metrics["slept_s"] == 0
                                    for r in reused)


def test_configs_stored_before_backend_options_were_nested_are_read_in_todays_layout():
    from orchestrator.resubmit import _nest_backend_options

    noop = {"backend": {"name": "noop", "sleep_s": 1.0, "allocate_gb": 0.0}}
    assert _nest_backend_options(noop) == {"backend": {"name": "noop", "noop": {"sleep_s": 1.0, "allocate_gb": 0.0}}}
    assert _nest_backend_options({"backend": {"name": "hf", "sleep_s": 0.0, "allocate_gb": 0.0}}) == {
        "backend": {"name": "hf"}}
