"""A sweep's live index: `status` on a running sweep reads one file its driver keeps up to date,
through start, finish, a killed driver and its resumption, and agrees with the runs themselves."""

import json
import signal
import subprocess
import sys

import pytest

from tests.helpers import tag_values, wait_for

pytestmark = pytest.mark.slow

SLOW_CELLS = ["backend=noop", "backend.noop.sleep_s=6", "seed=range(0,8)", "cluster.max_concurrent_trials=2",
              "cluster.fresh_worker_per_trial=false"]


def _status(run_cli, sweep_id: str, *flags: str) -> dict:
    proc = run_cli("status", sweep_id, "--json", *flags)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _rows(state: dict) -> dict:
    return {t["trial_key"]: (t["status"], t["run_id"], t["latest_attempt"]) for t in state["trials"]}


def _driver(tmp_path, cli_env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "run", "-m", *SLOW_CELLS], cwd=tmp_path, env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _running_state(run_cli, tmp_path, want) -> dict:
    """The live status once ``want(state)`` holds (the sweep's id from the store)."""
    found = {}

    def seen() -> bool:
        ids = tag_values(tmp_path / "mlflow.db", "sweep_id") if (tmp_path / "mlflow.db").exists() else []
        if not ids:
            return False
        found.update(_status(run_cli, ids[0]))
        seen_counts.append((found["counts"], found.get("live")))
        return found.get("live") is not None and want(found)

    seen_counts: list = []
    wait_for(seen, 180, f"the live index (seen: {seen_counts})")
    return found


def test_status_follows_a_running_sweep_from_its_index_and_the_final_index_agrees_with_the_runs(
        run_cli, tmp_path, cli_env):
    driver = _driver(tmp_path, cli_env)
    try:
        state = _running_state(run_cli, tmp_path, lambda s: s["counts"].get("RUNNING") and s["counts"].get("PENDING"))
        assert sum(state["counts"].values()) == 8 and state["sweep_status"] == "RUNNING"
        assert state["live"]["stale"] is False and "pid" in state["live"]["driver"]
        running = [t for t in state["trials"] if t["status"] == "RUNNING"]
        assert running and all(t["run_id"] and t["attempts"] == 1 for t in running)
        assert all(t["run_id"] == "" and t["reason"] == "not started" for t in state["trials"]
                   if t["status"] == "PENDING")
        out, err = driver.communicate(timeout=300)
        assert driver.returncode == 0, err[-3000:]
    finally:
        driver.kill()
    sweep_id = state["sweep_id"]
    done, fresh = _status(run_cli, sweep_id), _status(run_cli, sweep_id, "--refresh")
    assert done["live"] is None and done["counts"] == {"FINISHED": 8} and done["sweep_status"] == "FINISHED"
    assert _rows(done) == _rows(fresh)


def test_a_killed_drivers_index_is_shown_stale_and_resume_brings_it_up_to_date(run_cli, tmp_path, cli_env):
    driver = _driver(tmp_path, cli_env)
    try:
        state = _running_state(run_cli, tmp_path, lambda s: s["counts"].get("FINISHED") and s["counts"].get("RUNNING"))
        # The index is up to 5 s old and `status` takes seconds: its RUNNING trials may have ended since. Kill when
        # the store itself holds an open run, so that the driver leaves one for resume to close (on a busy machine
        # the kill once landed between two pairs of trials, and no run was left open).
        wait_for(lambda: "RUNNING" in tag_values(tmp_path / "mlflow.db", "status"), 60, "a run open in the store")
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        driver.kill()
    sweep_id = state["sweep_id"]
    stale = _status(run_cli, sweep_id)
    assert stale["sweep_status"] == "RUNNING" and stale["live"]["stale"] is True and stale["live"]["driver"] is None
    assert stale["live"]["written_at"] >= state["live"]["written_at"] and stale["counts"].get("RUNNING")
    table = run_cli("status", sweep_id)
    assert "STALE: its driver is gone; these rows are as of" in " ".join(table.stdout.split())
    fresh = _status(run_cli, sweep_id, "--refresh")
    assert fresh["live"] is None and sum(fresh["counts"].values()) == 8

    resumed = run_cli("resume", sweep_id)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after, runs = _status(run_cli, sweep_id), _status(run_cli, sweep_id, "--refresh")
    assert after["live"] is None and after["counts"] == {"FINISHED": 8}
    assert _rows(after) == _rows(runs)
    assert any(t["latest_attempt"] == 2 for t in after["trials"])  # the runs the killed driver left open
