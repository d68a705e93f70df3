"""Resubmission and resume into the same sweep, through a real `mlflow server`, with real Ray.

Failures are real too: ``backend.noop.allocate_gb=1000000`` makes a no-op trial fail with an
out-of-memory error, and the fixing override ``backend.noop.allocate_gb=0`` is what a user
would pass to dodge an OOM.
"""

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import SUMMARY, runs_by_key, tag_values, wait_for

pytestmark = pytest.mark.slow


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

    _, parents, runs = runs_by_key(mlflow_server.uri)
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
    # 8 s trials: a run seen RUNNING is still open when the kill lands (its start is a deferred write, made
    # late when the writer is busy, e.g. with the sweep's live index).
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", "-m", "backend=noop", "backend.noop.sleep_s=8",
                               "seed=1,2,3,4,5", "cluster.max_concurrent_trials=2", store],
                              cwd=tmp_path, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: {"FINISHED", "RUNNING"} <= set(tag_values(mlflow_server.db, "status")), 120,
                  "a first trial finished and a later one running")
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        driver.kill()
    sweep_id = tag_values(mlflow_server.db, "sweep_id")[0]
    with sqlite3.connect(f"file:{mlflow_server.db}?mode=ro", uri=True) as conn:
        left_open = conn.execute("SELECT count(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]
    assert left_open > 1, "the killed driver left its parent run and unfinished trials open"
    # Runs are made when trials start: the cells not started have none, and only the sweep's plan
    # knows them. One more, as if its start had never been written.
    client, _, runs = runs_by_key(mlflow_server.uri)
    unmade = next(r for attempts in runs.values() for r in attempts if r.data.tags["status"] != "FINISHED")
    client.delete_run(unmade.info.run_id)
    without_run = 5 - (len(runs) - 1)

    resumed = run_cli("resume", sweep_id, store)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"sweep {sweep_id}: its driver is gone; closed" in resumed.stdout
    assert f"{without_run} planned trials have no run (the driver died before making them): run as attempt 1" \
        in resumed.stdout
    assert f"sweep {sweep_id} now: 5 trials (5 finished)" in resumed.stdout

    _, parents, runs = runs_by_key(mlflow_server.uri)
    assert len(runs) == 5 and parents[0].info.status == "FINISHED"
    for attempts in runs.values():
        assert [r.data.tags["status"] for r in attempts].count("FINISHED") == 1
        assert all(r.info.status != "RUNNING" for r in attempts)
        for stale in (r for r in attempts if r.data.tags["status"] != "FINISHED"):
            assert stale.data.tags["reason"] == "driver lost: the sweep's driver died"

    state = json.loads(run_cli("status", sweep_id, "--json", store).stdout)
    assert state["counts"] == {"FINISHED": 5}


def test_a_resubmitted_trial_runs_as_it_first_ran_its_gpu_timeout_and_cluster_settings(ray_cluster, run_cli,
                                                                                       tmp_path):
    from orchestrator import resubmit as resubmission
    from orchestrator import sweep_state
    from orchestrator import store

    ray_cluster.add_node(num_cpus=2, num_gpus=2)  # logical GPUs: Ray schedules them and sets CUDA_VISIBLE_DEVICES
    ray_cluster.wait_for_nodes()
    where = f"cluster.address={ray_cluster.address}"
    first = run_cli("run", "-m", "backend=noop", "backend.noop.sleep_s=30", "seed=1,2", "resources.num_gpus=1",
                    "resources.num_cpus=0.5", "resources.timeout_s=3", "cluster.max_concurrent_trials=1", where)
    sweep_id = SUMMARY.search(first.stdout).group(1)
    assert SUMMARY.search(first.stdout).groups()[1:] == ("2", "0", "0", "0", "2", "0"), first.stdout + first.stderr

    # What a resubmission plans, read back from the store: the trials' resources and the sweep's settings.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    state = sweep_state.load(uri, sweep_id, refresh=True)
    settings, trials, _ = resubmission.plan_trials(store.client(uri), state, "failed", [f"tracking.uri={uri}"],
                                                   False)
    assert settings.cluster.max_concurrent_trials == 1
    assert [(t.ray_options, t.timeout_s) for t in trials] == [({"num_cpus": 0.5, "num_gpus": 1.0}, 3.0)] * 2

    again = run_cli("resubmit", sweep_id, "--failed", where)
    assert SUMMARY.search(again.stdout).groups()[1:] == ("2", "0", "0", "0", "2", "0"), "timed out again: " + \
        again.stdout + again.stderr[-2000:]

    fixed = run_cli("resubmit", sweep_id, "--failed", "backend.noop.sleep_s=0", "cluster.max_concurrent_trials=2", where)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr[-3000:]
    assert "resubmit: cluster.max_concurrent_trials=2 (the sweep ran with 1)" in fixed.stdout
    _, _, runs = runs_by_key(uri)
    for attempts in runs.values():
        latest = max(attempts, key=lambda r: int(r.data.tags["attempt"]))
        assert latest.data.tags["attempt"] == "3" and latest.data.tags["status"] == "FINISHED"
        assert latest.data.tags["cuda_visible_devices"] in ("0", "1"), "the resubmitted trial got its GPU"
        assert latest.data.params["resources.num_gpus"] == "1.0" and latest.data.params["resources.timeout_s"] == "3.0"
        assert latest.data.tags["resubmit_overrides"] == "backend.noop.sleep_s=0 cluster.max_concurrent_trials=2"


@pytest.fixture(scope="module")
def stored_failure(shared_mlflow_server, model_cache, tmp_path_factory):
    """One sweep of one trial that failed (out of memory): its id and its run. Each test that
    tampers with what the store holds puts it back (:func:`_tampering`)."""
    env = {**os.environ, "QUANTSWEEP_CACHE": str(model_cache)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", "backend=noop", "backend.noop.allocate_gb=1000000",
                           f"tracking.uri={shared_mlflow_server.uri}"], cwd=tmp_path_factory.mktemp("failure"),
                          env=env, capture_output=True, text=True, timeout=600)
    sweep_id = SUMMARY.search(proc.stdout).group(1)
    _, _, runs = runs_by_key(shared_mlflow_server.uri)
    [run] = [r for attempts in runs.values() for r in attempts if r.data.tags["sweep_id"] == sweep_id]
    return sweep_id, run


@contextlib.contextmanager
def _tampering(server, run):
    """An MLflow client to tamper with the run, its parent and their files; everything is put back after."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    parent = run.data.tags["mlflow.parentRunId"]
    with tempfile.TemporaryDirectory() as tmp:
        files = {(run_id, name): Path(client.download_artifacts(run_id, name, tmp)).read_text()
                 for run_id, name in ((run.info.run_id, "config.yaml"), (parent, "plan.json"))}
    tags = {run_id: dict(client.get_run(run_id).data.tags) for run_id in (run.info.run_id, parent)}
    try:
        yield client
    finally:
        for (run_id, name), text in files.items():
            client.log_text(run_id, text, name)
        for run_id, before in tags.items():
            now = client.get_run(run_id).data.tags
            for key in now.keys() - before.keys():
                client.delete_tag(run_id, key)
            for key, value in before.items():
                if now.get(key) != value:
                    client.set_tag(run_id, key, value)


def _refused(run_cli, server, *args) -> str:
    """Run a command that must be refused with one line and exit 2, with nothing run; its line."""
    before = _run_count(server.uri)
    proc = run_cli(*args, f"tracking.uri={server.uri}")
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orchestrator: error: "), proc.stderr[-3000:]
    assert _run_count(server.uri) == before, "nothing was submitted"
    return lines[0]


def _run_count(uri: str) -> int:
    return sum(len(a) for a in runs_by_key(uri)[2].values())


@pytest.mark.parametrize("tamper,rekey,message", [
    ({"seed": 0, "bogus": 1}, False, "stored config has unexpected contents"),
    ({"kernel": {"name": "torch", "_target_": "os.system"}}, False, "kernel._target_=os.system"),
    ({"eval": {"text": "${oc.env:MY_SECRET_TOKEN}"}}, False, "eval.text=${oc.env:MY_SECRET_TOKEN}: stored config"),
    ({"resources": {"timeout_s": float("nan")}}, False, "resources.timeout_s=nan: stored config"),
    ({"seed": 7}, False, "stored config and key disagree"),
    ({"bench": {"batch_size": -4}}, True, "bench.batch_size=-4: invalid value; allowed: >= 1"),
    ({"dtype": {"name": "x", "format": "int4", "group_size": "lots"}}, True, "dtype.group_size"),
    ({"seed": 1e38}, True, "seed=1e+38: wrong type"),
    ({"model": {"source": "path", "path": "/tmp/model-with-code", "trust_remote_code": True}}, True,
     "model.source=path: stored in trial"),
])
def test_a_tampered_stored_config_is_refused(shared_mlflow_server, stored_failure, tamper, rekey, message):
    """What `resubmit` plans from the store, in this process (the command's one line and exit 2, with
    nothing run, are checked on the stored files and tags below)."""
    import yaml

    from orchestrator import resubmit, store, sweep_state
    from orchestrator.compose import from_hydra
    from orchestrator.plan import trial_key

    sweep_id, run = stored_failure
    uri = shared_mlflow_server.uri
    with _tampering(shared_mlflow_server, run) as client, tempfile.TemporaryDirectory() as tmp:
        config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", tmp)).read_text())
        for key, value in tamper.items():
            config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
        client.log_text(run.info.run_id, yaml.safe_dump(config), "config.yaml")
        if rekey:  # whoever edits the store can edit the key tag to match, too
            client.set_tag(run.info.run_id, "trial_key", trial_key(config))
        state = sweep_state.load(uri, sweep_id, refresh=True)
        with pytest.raises(Exception) as refused:
            resubmit.plan_trials(store.client(uri), state, "failed", [f"tracking.uri={uri}",
                                                                     "backend.noop.allocate_gb=0"], False)
    assert message in str(from_hydra(refused.value)), refused.value  # what the command prints, in one line


@pytest.mark.parametrize("what,message", [
    ("python_tag", "stored config is not plain YAML"),
    ("plan_not_json", "stored plan is not JSON"),
    ("plan_key", "stored config and key disagree"),
    ("trial_key_tag", "trial_key tag of run"),
    ("attempt_tag", "attempt tag of run"),
])
def test_a_tampered_stored_file_or_tag_is_refused_and_nothing_runs(shared_mlflow_server, stored_failure, run_cli, what,
                                                                   message):
    sweep_id, run = stored_failure
    parent = run.data.tags["mlflow.parentRunId"]
    with _tampering(shared_mlflow_server, run) as client:
        if what == "python_tag":
            client.log_text(run.info.run_id, "!!python/object/apply:os.system ['touch /tmp/pwned']\n", "config.yaml")
        elif what == "plan_not_json":
            client.log_text(parent, "{not json", "plan.json")
        elif what == "plan_key":  # a plan cell under another key: resume would run it as a new trial
            with tempfile.TemporaryDirectory() as tmp:
                plan = json.loads(Path(client.download_artifacts(parent, "plan.json", tmp)).read_text())
            plan["trials"][0]["trial_key"] = "0123456789abcdef"
            client.log_text(parent, json.dumps(plan), "plan.json")
        elif what == "trial_key_tag":
            client.set_tag(run.info.run_id, "trial_key", "x' OR tags.kind != '")
        else:
            client.set_tag(run.info.run_id, "attempt", "two")
        line = _refused(run_cli, shared_mlflow_server, "resume", sweep_id, "backend.noop.allocate_gb=0")
    assert message in line


def test_no_address_is_taken_from_the_store(shared_mlflow_server, stored_failure, run_cli):
    """A dashboard address planted in a tag is never contacted (it would get the user's Ray token)."""
    import socket
    import threading

    sweep_id, run = stored_failure
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    contacted, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                contacted.append(listener.accept())
            except OSError:
                pass
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    parent = run.data.tags["mlflow.parentRunId"]
    try:
        with _tampering(shared_mlflow_server, run) as client:
            client.set_tag(parent, "ray_dashboard", f"http://127.0.0.1:{listener.getsockname()[1]}")
            client.set_tag(parent, "ray_job_submission_id", f"quantsweep-{sweep_id}")
            client.set_tag(parent, "driver_released", "0")  # a holder whose liveness is asked
            assert run_cli("status", sweep_id, f"tracking.uri={shared_mlflow_server.uri}").returncode == 0
            client.set_tag(run.info.run_id, "attempt", "two")  # refused after the lease was asked for
            _refused(run_cli, shared_mlflow_server, "resubmit", sweep_id, "--failed")
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert contacted == [], "nothing connected to the address in the tag"


def test_a_stored_model_source_is_taken_when_the_command_line_repeats_it(shared_mlflow_server, stored_failure, run_cli):
    """Runs the stored failure's next attempt: the last test of this module to use it."""
    import yaml

    from orchestrator.plan import trial_key

    sweep_id, run = stored_failure
    with _tampering(shared_mlflow_server, run) as client, tempfile.TemporaryDirectory() as tmp:
        config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", tmp)).read_text())
        config["model"]["path"] = "/data/checkpoints/tiny"  # not what conf/model/tiny-llama.yaml says
        client.log_text(run.info.run_id, yaml.safe_dump(config), "config.yaml")
        client.set_tag(run.info.run_id, "trial_key", trial_key(config))
        store = f"tracking.uri={shared_mlflow_server.uri}"
        refused = _refused(run_cli, shared_mlflow_server, "resubmit", sweep_id, "--failed", "backend.noop.allocate_gb=0")
        assert "model.path=/data/checkpoints/tiny: stored in trial" in refused
        vouched = run_cli("resubmit", sweep_id, "--failed", "backend.noop.allocate_gb=0",
                          "model.path=/data/checkpoints/tiny", store)
        assert vouched.returncode == 0, vouched.stderr[-3000:]


def test_sweep_reuse_takes_finished_cells_from_earlier_sweeps(run_cli, tmp_path):
    first = run_cli("run", "-m", "backend=noop", "seed=1,2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli("run", "-m", "backend=noop", "seed=1,2,3", "sweep.reuse=true")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "sweep.reuse=true: 2 of 3 trials taken from earlier sweeps, 1 to run" in second.stderr
    _, parents, runs = runs_by_key(f"sqlite:///{tmp_path / 'mlflow.db'}")
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


def test_configs_stored_before_methods_existed_are_read_with_their_keys():
    from orchestrator.plan import trial_config, trial_key
    from orchestrator.resubmit import _check_sections
    from tests.helpers import compose

    stored = trial_config(compose("dtype=int4"))
    del stored["method"]  # what a sweep stored before methods existed (no calib either: rtn has none)
    assert "calib" not in stored and _check_sections(stored, "trial x") is stored
    assert trial_key(stored) == "af2bda50a10a64cf"  # the key it was stored under
    del stored["seed"]
    with pytest.raises(Exception, match="seed: stored config has unexpected contents"):
        _check_sections(stored, "trial x")
