"""Cluster-grade scheduling and faults, end to end: the real CLI driving a real multi-node
Ray cluster on 127.0.0.1 (logical GPUs), recording into a real MLflow store.

The trials are ``backend=noop`` (sleep / allocate, no model) so that what is tested is
the orchestration: placement, retries after a node dies, timeouts, cancel, OOM.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import SUMMARY, mlflow_runs, tag_values, wait_for

pytestmark = pytest.mark.slow


def _driver(cli_env, cwd, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "run", *args], cwd=cwd, env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _children(db) -> dict[str, object]:
    parents, children = mlflow_runs(db)
    keys = [r.data.tags["trial_key"] for r in children]
    assert len(keys) == len(set(keys)), "one MLflow run per trial"
    assert all(r.info.status != "RUNNING" for r in parents + children), "no run left RUNNING"
    return {r.data.tags["overrides"]: r for r in children}


def test_a_node_dies_mid_sweep_and_its_trials_finish_elsewhere(ray_cluster, cli_env, tmp_path):
    workers = [ray_cluster.add_node(num_cpus=2, num_gpus=2) for _ in range(3)]
    ray_cluster.wait_for_nodes()
    driver = _driver(cli_env, tmp_path, "-m", "backend=noop", "backend.noop.sleep_s=6", "seed=1,2,3,4,5,6,7,8,9",
                     "resources.num_gpus=1", f"cluster.address={ray_cluster.address}")
    try:
        db = tmp_path / "mlflow.db"
        busy = wait_for(lambda: set(tag_values(db, "ray_node")), 120, "a trial starting")
        victim = next(n for n in workers if n.node_id in busy)
        ray_cluster.remove_node(victim)
        out, err = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 0, err[-3000:]
    assert SUMMARY.search(out).groups()[1:] == ("9", "9", "0", "0", "0", "0"), out
    runs = _children(db)
    assert len(runs) == 9 and all(r.data.tags["status"] == "FINISHED" for r in runs.values())
    retried = [r for r in runs.values() if r.data.tags["ray_executions"] == "2"]
    assert retried, "the trials of the dead node ran again"
    for run in retried:
        first, second = run.data.tags["ray_nodes"].split(",")
        assert first == victim.node_id and second != victim.node_id
    used = {n for r in runs.values() for n in r.data.tags["ray_nodes"].split(",")}
    assert len(used) == 3, "trials spread over all three nodes"


def test_resources_place_trials_and_what_no_node_fits_is_unsupported(ray_cluster, cli_env, tmp_path):
    plain = ray_cluster.add_node(num_cpus=2, num_gpus=1)
    h100 = ray_cluster.add_node(num_cpus=2, num_gpus=2, resources={"accelerator_type:H100": 1})
    ray_cluster.wait_for_nodes()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", "-m", "backend=noop",
         "resources.accelerator_type=H100,B200,null", "resources.num_gpus=2", "resources.memory_gb=0.5",
         f"cluster.address={ray_cluster.address}"], cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _children(tmp_path / "mlflow.db")
    by_type = {o.split("resources.accelerator_type=")[1].split()[0]: r for o, r in runs.items()}
    assert by_type["H100"].data.tags["status"] == "FINISHED"
    assert by_type["H100"].data.tags["ray_nodes"] == h100.node_id
    assert by_type["null"].data.tags["ray_nodes"] == h100.node_id, "2 GPUs on one node: only the H100 node has them"
    unfit = by_type["B200"].data.tags
    assert unfit["status"] == "UNSUPPORTED" and "accelerator_type:B200" in unfit["reason"]
    assert "accelerator_type:H100" in unfit["reason"], "the reason says what the nodes offer"
    assert plain.node_id not in {r.data.tags.get("ray_nodes") for r in runs.values()}


def test_timeout_frees_the_gpu_oom_is_named_and_unsupported_hardware_is_said(ray_cluster, cli_env, tmp_path):
    ray_cluster.add_node(num_cpus=2, num_gpus=1)
    ray_cluster.wait_for_nodes()
    address = f"cluster.address={ray_cluster.address}"

    def run(*args):
        return subprocess.run([sys.executable, "-m", "orchestrator", "run", *args, address, "sweep.name=faults"],
                              cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300)

    # Two trials for the node's only GPU: the first hangs past its timeout and is killed,
    # then the second gets the GPU. One at a time, so the order is fixed.
    started = time.monotonic()
    hung = run("-m", "backend=noop", "backend.noop.sleep_s=600,0", "resources.num_gpus=1", "resources.timeout_s=3",
               "cluster.max_concurrent_trials=1")
    assert hung.returncode == 1, hung.stderr[-3000:]
    assert SUMMARY.search(hung.stdout).groups()[1:] == ("2", "1", "0", "0", "1", "0"), hung.stdout
    assert time.monotonic() - started < 120, "the hung trial's GPU was freed at its timeout"
    oom = run("backend=noop", "backend.noop.allocate_gb=1000000")
    assert oom.returncode == 1, oom.stderr[-3000:]
    # A logical GPU from Ray, but no CUDA device in the worker: the trial says so before it computes.
    if not torch.cuda.is_available():
        unsupported = run("device=cuda", "resources.num_gpus=1")
        assert unsupported.returncode == 0, unsupported.stderr[-3000:]

    runs = _children(tmp_path / "mlflow.db")  # by their overrides: the cell's own, not the sweep's (cluster.*)
    timed_out = runs["backend=noop backend.noop.sleep_s=600 resources.num_gpus=1 resources.timeout_s=3"]
    assert timed_out.data.tags["status"] == "TIMEOUT" and timed_out.info.status == "FAILED"
    assert "resources.timeout_s=3" in timed_out.data.tags["reason"]
    assert runs["backend=noop backend.noop.allocate_gb=1000000"].data.tags["reason"].startswith("out of memory: ")
    if not torch.cuda.is_available():
        no_cuda = runs["device=cuda resources.num_gpus=1"].data.tags
        assert no_cuda["status"] == "UNSUPPORTED" and "no CUDA GPU is visible" in no_cuda["reason"]


def test_cancel_ends_the_open_trials_cancelled(cli_env, tmp_path):
    driver = _driver(cli_env, tmp_path, "-m", "backend=noop", "backend.noop.sleep_s=600", "seed=1,2,3",
                     "cluster.num_cpus=2")
    try:
        db = tmp_path / "mlflow.db"
        wait_for(lambda: "RUNNING" in tag_values(db, "status"), 120, "a trial starting")
        sweep_id = tag_values(db, "sweep_id")[0]
        cancel = subprocess.run([sys.executable, "-m", "orchestrator", "cancel", sweep_id], cwd=tmp_path, env=cli_env,
                                capture_output=True, text=True, timeout=120)
        out, err = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert cancel.returncode == 0, cancel.stderr[-3000:]
    assert f"sweep {sweep_id}: killed (3 cancelled)" in cancel.stdout
    assert driver.returncode == 1, err[-3000:]
    assert SUMMARY.search(out).groups()[1:] == ("3", "0", "0", "0", "0", "3"), out
    runs = _children(db)
    assert all(r.data.tags["status"] == "CANCELLED" and r.info.status == "KILLED" for r in runs.values())
    assert all("orchestrator cancel" in r.data.tags["reason"] for r in runs.values())


def test_sigterm_to_the_driver_cancels_like_ctrl_c(cli_env, tmp_path):
    driver = _driver(cli_env, tmp_path, "-m", "backend=noop", "backend.noop.sleep_s=600", "seed=1,2")
    try:
        wait_for(lambda: "RUNNING" in tag_values(tmp_path / "mlflow.db", "status"), 120, "a trial starting")
        driver.send_signal(signal.SIGTERM)
        out, err = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert SUMMARY.search(out).groups()[1:] == ("2", "0", "0", "0", "0", "2"), out + err[-2000:]
    parents, children = mlflow_runs(tmp_path / "mlflow.db")
    assert parents[0].info.status == "KILLED" and all(r.info.status == "KILLED" for r in children)


def test_status_lists_every_trial_as_json(run_cli, tmp_path):
    import json

    proc = run_cli("run", "-m", "backend=noop", "seed=1,2,3", "backend.noop.allocate_gb=0,1000000")
    sweep_id = SUMMARY.search(proc.stdout).group(1)
    status = run_cli("status", sweep_id, "--json")
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["counts"] == {"FINISHED": 3, "FAILED": 3} and state["sweep_status"] == "FINISHED"
    assert len(state["trials"]) == 6 and all(t["attempts"] == 1 for t in state["trials"])
    table = run_cli("status", sweep_id)
    assert f"sweep {sweep_id}: finished, 6 trials (3 failed, 3 finished)" in table.stdout
    missing = run_cli("status", "swp-000000")
    assert missing.returncode == 2 and "sweep=swp-000000: no such sweep" in missing.stderr
    injected = run_cli("status", "x' OR tags.kind != '")
    assert injected.returncode == 2 and "sweep=x' OR tags.kind != ': invalid value" in injected.stderr
    bad_id = run_cli("run", "backend=noop", "sweep.id=a/b")
    assert bad_id.returncode == 2 and "sweep.id=a/b: invalid value" in bad_id.stderr


def test_a_bad_resource_value_is_refused_before_anything_runs(run_cli, tmp_path):
    proc = run_cli("run", "-m", "backend=noop", "resources.timeout_s=0,5")
    assert proc.returncode == 2
    assert "resources.timeout_s=0.0: invalid value; allowed: > 0" in proc.stderr
    assert not os.path.exists(tmp_path / "mlflow.db")
