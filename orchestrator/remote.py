"""Sweeps whose driver runs on the cluster (Ray Jobs API), and cancelling any sweep.

``submit`` validates every cell here first, then submits ``orchestrator run`` as a Ray
Job with the project as its working_dir; the sweep id is chosen here, so it is known at
once. The job's driver tags the sweep's parent run with its submission id and the
dashboard address, so ``status`` and ``cancel`` find the job from the sweep id alone.

``cancel`` asks the driver to stop through a tag on the parent run (it checks every few
seconds and ends the open trials CANCELLED). If the sweep is a Ray Job that does not
stop in time, the job is stopped and the runs it left open are closed CANCELLED here.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from typing import Any, Optional

from jobs.spec import Status
from orchestrator import sweep_state
from orchestrator import store, tracking
from orchestrator.paths import PROJECT_ROOT

SUBMIT_DEADLINE_S = 120.0
JOB_ENV = "QUANTSWEEP_RAY_JOB"  # "<dashboard address> <submission id>", set on a submitted driver
WORKING_DIR_EXCLUDES = [".git", ".venv", "venv", ".scratch", ".whl", ".device", "mlruns", "mlartifacts", "mlflow.db",
                        "*.egg-info", "__pycache__", ".pytest_cache", "outputs", "multirun"]


def submission_id(sweep_id: str) -> str:
    return f"quantsweep-{sweep_id}"


def job_tags() -> dict[str, str]:
    """Tags for the parent run when this driver runs as a submitted Ray Job."""
    if not os.environ.get(JOB_ENV):
        return {}
    address, job_id = os.environ[JOB_ENV].split(" ", 1)
    return {"ray_dashboard": address, "ray_job_submission_id": job_id}


def _job_client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(address: str, run_args: list[str], sweep_id: str, tracking_uri: str) -> str:
    """Submit ``orchestrator run <run_args>`` as a Ray Job writing to ``tracking_uri``; its submission id."""
    job_id = submission_id(sweep_id)
    args = [*run_args, f"sweep.id={sweep_id}", f"tracking.uri={tracking_uri}"]
    if not any(a.startswith("cluster.address=") for a in run_args):
        args.append("cluster.address=auto")  # the cluster the job runs on
    client = _job_client(address)
    # A head that has just started answers "No available agent ... try again later" for a while.
    store.retrying(lambda: client.submit_job(
        entrypoint=f"python -m orchestrator run {shlex.join(args)}", submission_id=job_id,
        runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": WORKING_DIR_EXCLUDES,
                     # The working dir travels without .git: the code's version goes with it.
                     "env_vars": {JOB_ENV: f"{address} {job_id}", **tracking.code_version_env()}},
        metadata={"sweep_id": sweep_id, "tracking_uri": tracking_uri}), SUBMIT_DEADLINE_S, "submit the ray job",
        "ray: dashboard")
    return job_id


def job_info(address: Optional[str], job_id: str) -> Optional[dict[str, Any]]:
    """The Ray Job's status, or None if there is no such job or no dashboard to ask."""
    if not address:
        return None
    try:
        info = _job_client(address).get_job_info(job_id)
    except Exception:  # no such job, or the dashboard is unreachable
        return None
    return {"submission_id": job_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message or ""}


def cancel(uri: str, sweep_id: str, address: Optional[str], wait_s: float) -> sweep_state.SweepState:
    """Stop a running sweep; returns its state afterwards. Raises ConfigError if there is no such sweep."""
    client = store.client(uri)
    state = sweep_state.load(uri, sweep_id)
    if state.sweep_status != "RUNNING":
        print(f"sweep {sweep_id} is not running (its run is {state.sweep_status})", file=sys.stderr)
        return state
    client.set_tag(state.parent_run_id, tracking.CANCEL_TAG, "true")
    print(f"asked the driver of sweep {sweep_id} to stop", file=sys.stderr)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if client.get_run(state.parent_run_id).info.status != "RUNNING":
            return sweep_state.load(uri, sweep_id)
        time.sleep(1)
    # The dashboard is the one the user names, never an address read from the store.
    job_address, job_id = address, submission_id(sweep_id)
    job = job_info(job_address, job_id)
    if job is None:
        print(f"the driver of sweep {sweep_id} did not stop within {wait_s:g} s and it is not a Ray Job this "
              f"command can stop; its runs stay open", file=sys.stderr)
        return sweep_state.load(uri, sweep_id)
    _job_client(job_address).stop_job(job_id)
    while job_info(job_address, job_id)["status"] not in ("STOPPED", "SUCCEEDED", "FAILED"):
        time.sleep(1)
    sweep_state.close_open_runs(client, sweep_state.load(uri, sweep_id, refresh=True), Status.CANCELLED,
                                 "cancelled: orchestrator cancel stopped the job")
    return sweep_state.load(uri, sweep_id)
