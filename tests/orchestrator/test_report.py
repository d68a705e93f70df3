"""The comparison report on a real MLflow store: pairing with baselines, deltas on the trial runs,
the files on the parent run. The sweep's runs are written as a driver writes them."""

import json
import math

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from orchestrator import cli, pairing, plan, report
from orchestrator.errors import ConfigError
from tests.helpers import compose

SWEEP = "swp-abc123"
PNG = b"\x89PNG\r\n\x1a\n"


def _trial(client, experiment, parent, overrides, status="FINISHED", attempt=1, **metrics):
    params = dict(o.split("=", 1) for o in overrides.split())
    flat = {"model.name": params.get("model", "tiny"), "model.dtype": "bfloat16", "dtype.name": params.get("dtype", "bf16"),
            "quant.name": "weight_only", "kernel.name": params.get("kernel", "torch"), "backend.name": "hf",
            "bench.batch_size": params.get("bench.batch_size", "1"), "seed": "0", "device": "auto"}
    run = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "sweep_id": SWEEP, "kind": "trial",
                                              "trial_key": overrides.replace(" ", "_"), "attempt": str(attempt),
                                              "overrides": overrides, "status": status})
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flat.items()],
                     metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
    if status == "FINISHED":
        client.log_text(run.info.run_id, json.dumps({"prefill_ms": [5.0, 6.0], "decode_ms": [1.0, 1.5, 2.0]}),
                        "latency_ms.json")
    client.set_terminated(run.info.run_id, "FINISHED" if status in ("FINISHED", "UNSUPPORTED") else "FAILED")
    return run.info.run_id


def _measured(decode, prefill, memory, ppl, kl, top1=0.99):
    return dict(decode_tokens_per_s=decode, prefill_tokens_per_s=prefill, peak_memory_mb=memory, weight_bytes=memory * 1e6,
                perplexity=ppl, kl_divergence=kl, top1_agreement=top1)


@pytest.fixture
def sweep_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("report")
    parent = client.create_run(experiment, tags={"sweep_id": SWEEP, "kind": "sweep",
                                                 "baseline": json.dumps({"dtype": "bf16", "kernel": "torch"})})
    pid = parent.info.run_id
    ids = {
        "base": _trial(client, experiment, pid, "model=a dtype=bf16 kernel=torch", **_measured(100, 1000, 200, 10.0, 0.0, 1.0)),
        "int8": _trial(client, experiment, pid, "model=a dtype=int8 kernel=torch", **_measured(150, 1200, 120, 10.5, 0.002)),
        # A later attempt of the same key wins over the first, which failed.
        "int4_old": _trial(client, experiment, pid, "model=a dtype=int4 kernel=triton", status="FAILED"),
        "int4": _trial(client, experiment, pid, "model=a dtype=int4 kernel=triton", attempt=2,
                       **_measured(300, 1100, 80, 12.0, 0.05, 0.9)),
        # Another batch size: its own cell, with no bf16 cell beside it.
        "lonely": _trial(client, experiment, pid, "model=a dtype=int8 kernel=torch bench.batch_size=8",
                         **_measured(400, 4000, 300, 10.5, 0.002)),
        # Model b's baseline failed: its int8 trial has nothing to compare with.
        "b_base": _trial(client, experiment, pid, "model=b dtype=bf16 kernel=torch", status="FAILED"),
        "b_int8": _trial(client, experiment, pid, "model=b dtype=int8 kernel=torch", **_measured(50, 500, 50, 20.0, 0.01)),
    }
    client.set_terminated(pid)
    return uri, client, pid, ids


def test_each_trial_gets_its_own_baselines_speedups_and_deltas_logged_on_its_run(sweep_store, tmp_path):
    uri, client, parent_id, ids = sweep_store
    rows, names = report.generate(uri, SWEEP, tmp_path / "out")
    assert len(rows) == 6  # one row per trial key: the failed first attempt of int4 is not one

    int4 = client.get_run(ids["int4"]).data
    assert int4.metrics["speedup_decode"] == 3.0 and int4.metrics["speedup_prefill"] == 1.1
    assert int4.metrics["memory_ratio"] == 0.4 and int4.metrics["weight_memory_ratio"] == 0.4
    assert int4.metrics["perplexity_delta"] == 2.0
    assert int4.tags["baseline_run_id"] == ids["base"]
    assert client.get_run(ids["int8"]).data.metrics["speedup_decode"] == 1.5
    base = client.get_run(ids["base"]).data
    assert base.metrics["speedup_decode"] == 1.0 and base.metrics["perplexity_delta"] == 0.0

    lonely = client.get_run(ids["lonely"]).data
    assert lonely.tags["baseline"].startswith("missing: no dtype=bf16 kernel=torch cell")
    assert "speedup_decode" not in lonely.metrics  # never compared with another cell instead
    b_int8 = client.get_run(ids["b_int8"]).data
    assert b_int8.tags["baseline"].endswith("(FAILED: nothing to compare with)") and "speedup_decode" not in b_int8.metrics

    assert set(names) == {"comparison.csv", "comparison.html", "pareto_a.png", "pareto_b.png", "speedup_heatmap.png",
                          "latency.png"}
    on_parent = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert on_parent == {f"report/{n}" for n in names}
    for name in names:
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(PNG) if name.endswith(".png") else data
    csv_lines = (tmp_path / "out" / "comparison.csv").read_text().splitlines()
    assert len(csv_lines) == 7 and csv_lines[0].startswith("trial,status,model,dtype")
    page = (tmp_path / "out" / "comparison.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "3.00x" in page and "no baseline for 1 trials" in page


def test_report_command_prints_the_table_and_refuses_an_unknown_sweep(sweep_store, capsys, monkeypatch):
    uri, *_ = sweep_store
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps the headers on a narrow terminal
    assert cli.main(["report", SWEEP, f"tracking.uri={uri}"]) == 0
    out = capsys.readouterr().out
    assert "×decode" in out and "3.00x" in out and "report: comparison.csv" in out
    assert cli.main(["report", "swp-000000", f"tracking.uri={uri}"]) == 2
    assert "no such sweep" in capsys.readouterr().err


def test_pareto_frontier_keeps_the_points_no_other_beats():
    points = [(0.0, 100.0), (0.001, 150.0), (0.002, 120.0), (0.05, 300.0), (0.06, 250.0)]
    assert report._frontier(points) == [(0.0, 100.0), (0.001, 150.0), (0.05, 300.0)]


def test_deltas_need_both_sides():
    assert pairing.deltas({"decode_tokens_per_s": 10.0}, {}) == {}
    assert pairing.deltas({"perplexity": 11.0}, {"perplexity": 10.0}) == {"perplexity_delta": 1.0}
    assert math.isclose(pairing.deltas({"peak_memory_mb": 1.0}, {"peak_memory_mb": 4.0})["memory_ratio"], 0.25)


def test_planning_finds_the_cells_without_a_baseline():
    cells = [compose("dtype=bf16"), compose("dtype=int8"), compose("dtype=int8", "bench.batch_size=4")]
    trials = [plan.planned_trial(c, []) for c in cells]
    assert [t.baseline for t in trials] == [True, False, False]
    configs = [t.spec.config for t in trials]
    assert pairing.missing_baselines(configs, {"dtype": "bf16", "kernel": "torch", "backend": "hf"}) == [2]
    # Another baseline choice: the fp16 cell would be it, and there is none.
    assert pairing.missing_baselines(configs, {"dtype": "fp16"}) == [0, 1, 2]


def test_a_baseline_on_a_section_that_is_not_compared_is_refused():
    with pytest.raises(ConfigError, match=r"sweep\.baseline\.model.*keys of sweep\.baseline: dtype, quant, kernel, backend"):
        plan.sweep_settings([compose("+sweep.baseline.model=tiny-llama")])


def test_a_big_sweep_draws_the_latency_of_its_baselines_and_pareto_optimal_trials_only():
    def row(i, kl, decode, baseline=False):
        r = pairing.Row(f"k{i}", f"r{i}", f"seed={i}", "FINISHED", {"model.name": "a"},
                       {"kl_divergence": kl, "decode_tokens_per_s": decode})
        r.is_baseline = baseline
        return r
    rows = [row(0, 0.0, 100.0, baseline=True)] + [row(i, 0.01 * i, 100.0 + (i % 7)) for i in range(1, 60)]
    shown = report._latency_rows(rows)
    assert [r.key for r in shown] == ["k0", "k1", "k2", "k3", "k4", "k5", "k6"]
    assert report._latency_rows(rows[:10]) == rows[:10]
