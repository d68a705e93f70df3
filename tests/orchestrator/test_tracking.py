"""The sweep tracker's writer on a real sqlite MLflow store: ordering, one run per trial."""

import threading

from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from jobs.spec import Status, TrialResult, TrialSpec
from orchestrator import store, tracking
from tests.helpers import compose


def test_a_result_that_overtakes_its_runs_creation_makes_one_complete_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.SweepTracker(uri, "writer", "swp-111111", tags={})
    hold = threading.Event()
    tracker.writer.submit("hold the writer", hold.wait)  # everything below queues behind this
    spec = TrialSpec(trial_key="0123456789abcdef", config={"seed": 1, "bench": {"batch_size": 2}}, overrides=("seed=1",))
    tracker.mark_running(spec, "node-1", 1)  # deferrable: yields to the result below
    tracker.finish_trial(spec, TrialResult(spec.trial_key, Status.FINISHED, metrics={"x": 1.5},
                                           env={"host": "h"}, artifacts={"trial.log": "done"}), {"ray_executions": "1"})
    tracker.finish_sweep()
    hold.set()
    assert tracker.writer.flush(60) and tracker.writer.errors == []

    client = MlflowClient(uri)
    runs = client.search_runs([tracker.experiment_id], filter_string="tags.kind = 'trial'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "FINISHED"
    assert run.data.tags["trial_key"] == spec.trial_key and run.data.tags["host"] == "h"
    assert run.data.tags["mlflow.parentRunId"] == tracker.parent_id and run.data.tags["overrides"] == "seed=1"
    assert run.data.params == {"seed": "1", "bench.batch_size": "2"} and run.data.metrics["x"] == 1.5
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "trial.log"}
    assert tracking.INDEX_FILE in {a.path for a in client.list_artifacts(tracker.parent_id)}
    assert client.get_run(tracker.parent_id).info.status == "FINISHED"


def test_sqlite_stores_commit_without_fsync_and_share_one_listener(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first, second = store.client(uri), store.client(uri)
    for client in (first, second):
        with client._tracking_client.store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL


def test_a_started_trial_has_its_run_and_config_before_its_result(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.SweepTracker(uri, "writer", "swp-222222", tags={})
    spec = TrialSpec(trial_key="fedcba9876543210", config={"seed": 2}, overrides=("seed=2",))
    tracker.write_plan([spec], OmegaConf.to_container(compose(), resolve=True))
    tracker.mark_running(spec, "node-1", 1)
    assert tracker.writer.flush(60) and tracker.writer.errors == []
    client = MlflowClient(uri)
    (run,) = client.search_runs([tracker.experiment_id], filter_string="tags.kind = 'trial'")
    assert run.info.status == "RUNNING" and run.data.tags["status"] == "RUNNING" and run.data.tags["ray_node"] == "node-1"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    assert tracking.PLAN_FILE in {a.path for a in client.list_artifacts(tracker.parent_id)}


def test_a_trial_records_contents_are_made_without_a_store():
    spec = TrialSpec(trial_key="0123456789abcdef", config={"seed": 3, "bench": {"batch_size": 2}}, overrides=("seed=3",))
    result = TrialResult("0123456789abcdef", Status.FAILED, metrics={"x": 1}, env={"host": "h"},
                         artifacts={"trial.log": "log"}, reason="out of memory: " + "x" * 6000, duration_s=2.5,
                         series={"system/cpu": [(1000, 0, 50.0), (2000, 1, 60.0)]})
    record = tracking.trial_record(spec, result, {"ray_nodes": "n1"}, now=7)
    assert record.tags == {"host": "h", "ray_nodes": "n1", "status": "FAILED", "reason": result.reason[:5000]}
    assert record.params == {"seed": "3", "bench.batch_size": "2"}
    assert record.metrics == [("x", 1.0, 7, 0), ("duration_s", 2.5, 7, 0), ("system/cpu", 50.0, 1000, 0),
                              ("system/cpu", 60.0, 2000, 1)]
    assert record.files == {"trial.log": "log", "config.yaml": "seed: 3\nbench:\n  batch_size: 2\n"}
    assert record.mlflow_status == "FAILED"
    assert tracking.ending_tags(Status.CANCELLED, None) == {"status": "CANCELLED"}
