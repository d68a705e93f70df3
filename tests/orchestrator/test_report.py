"""The comparison report on a real MLflow store: pairing with baselines, deltas on the trial runs,
the files on the parent run. The sweep's runs are written as a driver writes them."""

import json
import math
import re
import statistics

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from orchestrator import cli, pairing, plan, report
from orchestrator.errors import ConfigError
from tests.helpers import compose

SWEEP = "swp-abc123"
PNG = b"\x89PNG\r\n\x1a\n"


def _windows_csv(nll):
    return "window,nll,reference_nll,kl_divergence,top1_agreement\n" + "".join(
        f"{i},{v!r},{v!r},0.0,1.0\n" for i, v in enumerate(nll))


# Per-window NLLs of the same 20 windows: int8 moves them by much less than their spread from
# window to window (within noise, once paired), int4 by much more.
BASE_NLL = [2.3 + 0.1 * math.sin(i) for i in range(20)]
INT8_NLL = [v + 0.001 + 0.01 * math.cos(7 * i) for i, v in enumerate(BASE_NLL)]
INT4_NLL = [v + 0.18 + 0.01 * math.cos(3 * i) for i, v in enumerate(BASE_NLL)]


def _ppl(nll):
    return math.exp(sum(nll) / len(nll))


def _trial(client, experiment, parent, overrides, status="FINISHED", attempt=1, windows=None, **metrics):
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
    if windows is not None:
        client.log_text(run.info.run_id, windows, "eval_windows.csv")
    client.set_terminated(run.info.run_id, "FINISHED" if status in ("FINISHED", "UNSUPPORTED") else "FAILED")
    return run.info.run_id


def _measured(decode, prefill, memory, ppl, kl, top1=0.99):
    return dict(decode_tokens_per_s=decode, prefill_tokens_per_s=prefill, peak_memory_mb=memory, weight_bytes=memory * 1e6,
                perplexity=ppl, nll=math.log(ppl), kl_divergence=kl, top1_agreement=top1)


@pytest.fixture
def sweep_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("report")
    parent = client.create_run(experiment, tags={"sweep_id": SWEEP, "kind": "sweep",
                                                 "baseline": json.dumps({"dtype": "bf16", "kernel": "torch"})})
    pid = parent.info.run_id
    ids = {
        "base": _trial(client, experiment, pid, "model=a dtype=bf16 kernel=torch", windows=_windows_csv(BASE_NLL),
                       **_measured(100, 1000, 200, 10.0, 0.0, 1.0)),
        "int8": _trial(client, experiment, pid, "model=a dtype=int8 kernel=torch", windows=_windows_csv(INT8_NLL),
                       **_measured(150, 1200, 120, 10.5, 0.002)),
        # A later attempt of the same key wins over the first, which failed.
        "int4_old": _trial(client, experiment, pid, "model=a dtype=int4 kernel=triton", status="FAILED"),
        "int4": _trial(client, experiment, pid, "model=a dtype=int4 kernel=triton", attempt=2,
                       windows=_windows_csv(INT4_NLL), **_measured(300, 1100, 80, 12.0, 0.05, 0.9)),
        # A stored per-window file that is not what a trial writes: refused, noted, not paired.
        "fp8": _trial(client, experiment, pid, "model=a dtype=fp8_e4m3 kernel=torch",
                      windows=_windows_csv(INT8_NLL).replace("\n3,", "\n9,"), **_measured(150, 1200, 120, 10.5, 0.002)),
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
    rows, names, _ = report.generate(uri, SWEEP, tmp_path / "out")
    assert len(rows) == 7  # one row per trial key: the failed first attempt of int4 is not one

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
    assert len(csv_lines) == 8 and csv_lines[0].startswith("trial,status,model,dtype")
    page = (tmp_path / "out" / "comparison.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "3.00x" in page and "no baseline for 1 trials" in page


def test_accuracy_deltas_carry_their_paired_standard_error_and_say_when_they_are_noise(sweep_store, tmp_path):
    uri, client, _, ids = sweep_store
    report.generate(uri, SWEEP, tmp_path / "out")
    int8, int4 = client.get_run(ids["int8"]).data.metrics, client.get_run(ids["int4"]).data.metrics
    differences = [a - b for a, b in zip(INT8_NLL, BASE_NLL)]
    assert int8["nll_delta"] == pytest.approx(sum(differences) / 20, rel=1e-12)
    assert int8["nll_delta_stderr"] == pytest.approx(statistics.stdev(differences) / math.sqrt(20), rel=1e-12)
    linearised = [_ppl(INT8_NLL) * a - _ppl(BASE_NLL) * b for a, b in zip(INT8_NLL, BASE_NLL)]
    assert int8["perplexity_delta_stderr"] == pytest.approx(statistics.stdev(linearised) / math.sqrt(20), rel=1e-12)
    # Unpaired, the windows' spread (0.07) would swamp int8's shift; paired, it is 0.002 +- 0.0016.
    assert int8["nll_delta_stderr"] < 0.003 < statistics.stdev(BASE_NLL) / math.sqrt(20)
    assert int8["perplexity_delta_within_noise"] == 1.0 and int4["perplexity_delta_within_noise"] == 0.0
    fp8 = client.get_run(ids["fp8"]).data.metrics
    assert "perplexity_delta" in fp8 and "perplexity_delta_stderr" not in fp8
    page = (tmp_path / "out" / "comparison.html").read_text()
    assert page.count(" (noise)</td>") == 1 and " ± " in page
    assert "dtype=fp8_e4m3 kernel=torch: its stored per-example scores were refused (eval_windows.csv: row 4 is not window 3" in page
    header = (tmp_path / "out" / "comparison.csv").read_text().splitlines()[0].split(",")
    assert {"perplexity_delta_stderr", "perplexity_delta_within_noise", "kl_divergence_p99_9"} <= set(header)


def test_a_second_report_does_not_take_the_first_ones_task_deltas_for_task_metrics():
    row = pairing.Row("k", "r", "", "FINISHED", {}, {"t.acc": 0.5, "t.acc_stderr": 0.1, "t.acc_delta": 0.1,
                                                      "t.acc_delta_stderr": 0.1, "t.acc_correct_to_wrong": 0.2})
    assert report.task_metrics([row]) == ["t.acc"]
    assert "t.acc_delta_delta" not in report.task_columns([row])


def test_a_reused_trial_carries_the_files_its_report_pairs(sweep_store, tmp_path):
    from orchestrator import sweep

    _, client, _, ids = sweep_store
    files = sweep._paired_files(client, ids["base"])
    assert set(files) == {"eval_windows.csv"} and pairing.parse_windows(files["eval_windows.csv"])["nll"] == BASE_NLL
    assert sweep._paired_files(client, ids["lonely"]) == {}
    # A folder where the file should be: refused, not a crash.
    (tmp_path / "eval_windows.csv").mkdir()
    (tmp_path / "eval_windows.csv" / "x").write_text("x")
    client.log_artifacts(ids["lonely"], str(tmp_path / "eval_windows.csv"), "eval_windows.csv")
    assert sweep._paired_files(client, ids["lonely"]) == {}


@pytest.mark.parametrize("text,problem", [
    ("window,nll\n0,1.0\n", "the header must be window,nll,reference_nll,kl_divergence,top1_agreement"),
    (_windows_csv([1.0, 2.0]).replace("\n1,", "\n0,"), "row 2 is not window 1"),
    (_windows_csv([1.0]).replace("1.0,1.0,0.0", "nan,1.0,0.0"), "window 0 nll='nan' is not a finite number"),
    (_windows_csv([1.0]).replace("1.0,1.0,0.0", "1" * 41 + ",1.0,0.0"), "is not a finite number"),
    (_windows_csv([1.0]).replace(",0.0,", ",__import__('os'),"), "kl_divergence=\"__import__('os')\" is not a finite"),
    (_windows_csv([1.0]).replace(",0.0,", ",1_0.0,"), "kl_divergence='1_0.0' is not a finite number"),
])
def test_a_stored_per_window_file_is_checked_like_input(text, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        pairing.parse_windows(text)


def test_report_command_prints_the_table_and_refuses_an_unknown_sweep(sweep_store, capsys, monkeypatch):
    uri, *_ = sweep_store
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps the headers on a narrow terminal
    assert cli.main(["report", SWEEP, f"tracking.uri={uri}"]) == 0
    out = capsys.readouterr().out
    assert "×decode" in out and "3.00x" in out and "report: comparison.csv" in out
    assert re.search(r"~\+[0-9.e-]+±", out) and "marks a delta within 1.96" in out  # int8: within noise
    assert cli.main(["report", "swp-000000", f"tracking.uri={uri}"]) == 2
    assert "no such sweep" in capsys.readouterr().err


def test_the_method_column_names_the_rounding_and_every_transform_on():
    assert pairing.method_label({}) == "rtn"  # a run from before methods existed
    assert pairing.method_label({"method.name": "gptq", "method.rotation": "hadamard",
                                 "method.rotation_size": "16"}) == "gptq+hadamard/16"
    assert pairing.method_label({"method.name": "rtn", "method.rotation": "random", "method.rotation_size": "0",
                                 "method.scaling": "awq", "method.clip": "True"}) == "rtn+random+awq+clip"


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
    with pytest.raises(ConfigError, match=r"sweep\.baseline\.model.*keys of sweep\.baseline: dtype, quant, method, kernel, backend"):
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


def test_the_terminal_table_keeps_every_column_in_80_columns_with_long_labels(capsys):
    def row(i, label, baseline=False):
        r = pairing.Row(f"k{i}", f"r{i}", label, "FINISHED", {"model.name": "a"},
                        {"kl_divergence": 1e-3, "decode_tokens_per_s": 50.0, "top1_agreement": 0.97})
        r.is_baseline, r.label = baseline, label
        return r
    rows = [row(0, "method=rtn dtype=bf16", True)] + [row(i, f"method=gptq dtype=mxfp{i} quant=w_a_static")
                                                       for i in range(1, 4)]
    report.print_table(rows, "swp-000000")
    out = capsys.readouterr().out
    assert all(len(line) <= 80 for line in out.splitlines())
    header = next(line for line in out.splitlines() if "tok/s" in line)
    assert header.split() == ["trial", "tok/s", "×decode", "×prefill", "×memory", "Δ", "ppl", "KL", "top-1"]
    assert "97.0%" in out.splitlines()[out.splitlines().index(header) + 2]  # the last column, whole
