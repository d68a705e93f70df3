"""End to end: `orchestrator run -m` on an embedded local Ray into a local MLflow store."""

import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import SUMMARY, mlflow_runs

FAST = ("debug=fast",)

pytestmark = pytest.mark.slow


def test_smoke_sweep_records_one_parent_and_three_finished_children(run_cli, tmp_path, tiny_model_cfg):
    proc = run_cli("run", "-m", "model=tiny-llama", "dtype=bf16,int8,int4", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = SUMMARY.search(proc.stdout)
    assert summary and summary.groups()[1:5] == ("3", "3", "0", "0"), proc.stdout
    sweep_id = summary.group(1)

    parents, children = mlflow_runs(tmp_path / "mlflow.db")
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep_id"] == sweep_id
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    kl = {}
    for run in children:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert run.info.status == "FINISHED" and tags["status"] == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["sweep_id"] == sweep_id
        assert tags["attempt"] == "1" and len(tags["trial_key"]) == 16 and tags["torch_version"]
        assert params["model.name"] == "tiny-llama" and params["bench.batch_size"] == "1"
        assert {"decode_tokens_per_s", "prefill_latency_p50_ms", "perplexity", "top1_agreement"} <= set(metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "trial.log"} <= artifacts
        kl[params["dtype.name"]] = metrics["kl_divergence"]
    assert kl["int4"] > kl["int8"] > 0

    # Compared with the bf16 cell, the baseline, on their own runs; the report on the parent.
    by_dtype = {r.data.params["dtype.name"]: r for r in children}
    base = by_dtype["bf16"]
    for dtype in ("int8", "int4"):
        run = by_dtype[dtype]
        assert run.data.tags["baseline_run_id"] == base.info.run_id
        speedup = client.get_run(run.info.run_id).data.metrics["speedup_decode"]
        assert speedup == run.data.metrics["decode_tokens_per_s"] / base.data.metrics["decode_tokens_per_s"]
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/comparison.csv", "report/comparison.html", "report/pareto_tiny-llama.png",
            "report/speedup_heatmap.png", "report/latency.png", "report/roofline.png", "report/whatif.csv"} <= report
    whatif = client.download_artifacts(parent.info.run_id, "report/whatif.csv", str(tmp_path / "whatif"))
    lines = open(whatif).read().splitlines()
    assert len(lines) == 1 + 3 * 5 and any(line.startswith("dtype=int4,B200-HGX,") for line in lines)
    assert "report: comparison.csv" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith(f"sweep {sweep_id}:")  # the summary line stays last


def test_a_sweep_over_methods_compares_them_against_one_baseline_with_standard_errors(run_cli, tmp_path,
                                                                                     tiny_model_cfg):
    import csv
    import io

    proc = run_cli("run", "-m", "method=rtn,gptq", "dtype=bf16,int4,mxfp4,nvfp4", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = SUMMARY.search(proc.stdout)
    # bf16 under gptq is the bf16 trial (no weights to quantize): 8 cells, 7 trials.
    assert summary and summary.groups()[1:5] == ("7", "7", "0", "0"), proc.stdout
    parents, children = mlflow_runs(tmp_path / "mlflow.db")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    base = next(r for r in children if r.data.params["dtype.name"] == "bf16")
    for run in children:
        params, metrics = run.data.params, client.get_run(run.info.run_id).data.metrics
        if run is base:
            continue
        assert run.data.tags["baseline_run_id"] == base.info.run_id
        assert metrics["perplexity_delta_stderr"] > 0 and metrics["quantize_s"] > 0
        if params["method.name"] == "gptq":
            assert params["calib.num_sequences"] == "16" and params["method.gptq.damp"] == "0.01"
            assert metrics["layer_output_error_mean"] < metrics["layer_output_error_rtn_mean"]
        else:
            assert not any(p.startswith("calib.") for p in params)
    table = client.download_artifacts(parents[0].info.run_id, "report/comparison.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(open(table).read())))
    assert {(r["dtype"], r["method"]) for r in rows} == {("bf16", "rtn")} | {
        (d, m) for d in ("int4", "mxfp4", "nvfp4") for m in ("rtn", "gptq")}
    assert all(r["perplexity_delta_stderr"] for r in rows if r["dtype"] != "bf16")


def test_a_failing_trial_is_recorded_failed_with_its_traceback_while_the_others_finish(run_cli, tmp_path, tiny_model_cfg):
    # group_size=512 divides none of the tiny model's layers: int4 (per-group) raises, int8 (per-channel) does not.
    proc = run_cli("run", "-m", "dtype=int8,int4", "dtype.group_size=512", *FAST)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert SUMMARY.search(proc.stdout).groups()[1:5] == ("2", "1", "1", "0"), proc.stdout

    _, children = mlflow_runs(tmp_path / "mlflow.db")
    by_dtype = {r.data.params["dtype.name"]: r for r in children}
    assert by_dtype["int8"].info.status == "FINISHED"
    failed = by_dtype["int4"]
    assert failed.info.status == "FAILED" and failed.data.tags["status"] == "FAILED"
    assert "group_size=512 does not divide" in failed.data.tags["reason"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    traceback_text = client.download_artifacts(failed.info.run_id, "traceback.txt", str(tmp_path))
    assert "FormatError" in open(traceback_text).read()


def test_a_single_run_is_a_sweep_of_one(run_cli, tmp_path, tiny_model_cfg):
    proc = run_cli("run", "dtype=int8", "sweep.name=single", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SUMMARY.search(proc.stdout).groups()[1:5] == ("1", "1", "0", "0")
    parents, children = mlflow_runs(tmp_path / "mlflow.db")
    assert len(parents) == 1 and len(children) == 1


def _a_trial_is_running(db) -> bool:
    """Read the store read-only with sqlite3: an MLflow client here would race the driver
    to create the schema while the driver is still migrating it."""
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT 1 FROM tags WHERE key = 'status' AND value = 'RUNNING'").fetchone() is not None
    except sqlite3.OperationalError:  # tables not created yet
        return False


def test_ctrl_c_leaves_no_run_running(cli_env, tmp_path, tiny_model_cfg):
    """SIGINT to the driver mid-sweep: every open child run ends CANCELLED, the parent KILLED."""
    # Long benchmarks, so the trials are still running when the interrupt comes.
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", "-m", "dtype=bf16,int8,int4",
                               "bench.repeats=1000"], cwd=tmp_path, env=cli_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if _a_trial_is_running(tmp_path / "mlflow.db"):
                break
            time.sleep(1)
        else:
            pytest.fail("no trial started within 180 s")
        driver.send_signal(signal.SIGINT)
        out, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, err[-3000:]
    assert "3 trials, 0 finished, 0 failed, 0 unsupported, 0 timeout, 3 cancelled" in out
    parents, children = mlflow_runs(tmp_path / "mlflow.db")
    assert parents[0].info.status == "KILLED"
    assert len(children) == 3
    assert all(r.info.status == "KILLED" and r.data.tags["status"] == "CANCELLED" for r in children)


def test_system_metrics_are_sampled_on_the_worker_into_the_trials_run(run_cli, tmp_path):
    proc = run_cli("run", "backend=noop", "backend.noop.sleep_s=1.5", "tracking.system_metrics_interval_s=0.3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, children = mlflow_runs(tmp_path / "mlflow.db")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(children[0].info.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 3 and [m.step for m in history] == list(range(len(history)))
    assert all(0 <= m.value <= 100 * 64 for m in history)
    assert "system/system_memory_usage_megabytes" in children[0].data.metrics
