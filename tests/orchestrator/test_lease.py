"""One driver per sweep, and stores and experiments that several drivers may create at once."""

import subprocess
import sys
import threading
from collections import Counter

import pytest

from orchestrator import store
from tests.helpers import SUMMARY, runs_by_key


def _start(cli_env, cwd, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_resumes_at_once_run_each_trial_once(run_cli, cli_env, tmp_path):
    first = run_cli("run", "-m", "backend=noop", "backend.noop.allocate_gb=1000000", "seed=1,2,3")
    sweep_id = SUMMARY.search(first.stdout).group(1)
    drivers = [_start(cli_env, tmp_path, "resume", sweep_id, "backend.noop.allocate_gb=0") for _ in range(2)]
    outcomes = [(d.wait(timeout=600), *d.communicate()) for d in drivers]
    codes = sorted(code for code, _, _ in outcomes)
    assert codes == [0, 2], outcomes
    refused = next(err for code, _, err in outcomes if code == 2)
    assert f"sweep={sweep_id}: another driver is acting on it (pid " in refused, refused
    assert len(refused.strip().splitlines()) == 1, refused

    _, _, runs = runs_by_key(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(runs) == 3
    for attempts in runs.values():
        assert Counter(r.data.tags["attempt"] for r in attempts) == {"1": 1, "2": 1}, "each key re-run once"


@pytest.mark.slow
def test_two_drivers_on_a_new_store_and_a_new_experiment_both_finish(cli_env, tmp_path):
    drivers = [_start(cli_env, tmp_path, "run", "-m", "backend=noop", f"seed={i}", "sweep.name=brand-new")
               for i in (1, 2)]
    outcomes = [(d.wait(timeout=600), *d.communicate()) for d in drivers]
    assert [code for code, _, _ in outcomes] == [0, 0], [err[-2000:] for _, _, err in outcomes]
    client = store.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(client.search_experiments(filter_string="name = 'brand-new'")) == 1


def test_an_experiment_made_by_many_at_once_is_one_experiment(tmp_path):
    client = store.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ids, errors = [], []

    def make():
        try:
            ids.append(store.open_experiment(client, "raced"))
        except Exception as error:  # the test reports it
            errors.append(error)
    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(ids)) == 1 and len(ids) == 8


def test_a_deleted_experiment_is_refused_in_one_line(tmp_path):
    from orchestrator.errors import ConfigError

    client = store.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.delete_experiment(store.open_experiment(client, "gone"))
    with pytest.raises(ConfigError, match="sweep.name=gone: its experiment is deleted in the store"):
        store.open_experiment(client, "gone")


def test_a_lease_is_taken_once_per_generation(tmp_path):
    from orchestrator import lease
    from orchestrator.errors import ConfigError

    client = store.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(store.open_experiment(client, "leases"))
    run_id = run.info.run_id
    mine = lease.claim_new(client, run_id)
    with pytest.raises(ConfigError, match=r"another driver is acting on it \(pid \d+ on "):
        lease.take(client, "swp-000001", run_id, None)  # this process holds it, and is alive
    lease.release(client, run_id, mine)
    second = lease.take(client, "swp-000001", run_id, None)
    assert second.generation == 2 and lease.latest(client.get_run(run_id)) == second
    client.set_tag(run_id, "driver_released", "2")
    client.log_param(run_id, "driver.3", "elsewhere 1 1.0 0123456789abcdef")  # a stale holder on another host
    assert lease.take(client, "swp-000001", run_id, None).generation == 4
    client.log_param(run_id, "driver.5", "$(reboot)")
    with pytest.raises(ConfigError, match="stored lease is malformed"):
        lease.take(client, "swp-000001", run_id, None)
