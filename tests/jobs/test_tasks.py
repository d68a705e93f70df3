"""lm-evaluation-harness tasks on a trial's quantized model: metrics with standard errors, per-example
scores, and the flips the report counts against the baseline."""

import math
import statistics

import pytest

from jobs.tasks import SHIPPED, TASKS_DIR, _ratio_stderr, metric_name, samples_csv
from orchestrator import pairing
from tests.helpers import SUMMARY, runs_by_key


def test_the_shipped_tasks_data_is_there_and_the_names_are_mlflows():
    for name in SHIPPED:
        assert (TASKS_DIR / f"{name}.jsonl").stat().st_size > 10_000
    assert metric_name("stdlib_next_word", "acc,none") == "stdlib_next_word.acc"
    assert metric_name("gsm8k", "exact_match,strict-match") == "gsm8k.exact_match_strict-match"
    assert metric_name("a/b c", "acc,none") == "a_b_c.acc"


def test_a_ratio_metrics_standard_error_is_the_mean_s_when_every_document_has_as_many_words():
    loglik = [-10.0, -12.5, -9.0, -14.0, -11.0]
    samples = [{"bits_per_byte": (ll, 20)} for ll in loglik]
    expected = statistics.stdev(loglik) / math.sqrt(5) / 20 / math.log(2)  # nats per byte -> bits
    assert _ratio_stderr(samples, "bits_per_byte", 0.0) == pytest.approx(expected, rel=1e-12)
    ppl = math.exp(-sum(loglik) / 100)
    assert _ratio_stderr([{"word_perplexity": (ll, 20)} for ll in loglik], "word_perplexity", ppl) == \
        pytest.approx(ppl * statistics.stdev(loglik) / math.sqrt(5) / 20, rel=1e-12)
    assert math.isnan(_ratio_stderr(samples[:1], "bits_per_byte", 0.0))


def test_flips_count_each_way_over_the_examples_both_scored():
    base = {("t", "acc"): {0: 1.0, 1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0}}
    trial = {("t", "acc"): {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.0, 4: 0.0, 5: 1.0}}  # doc 5: the baseline has none
    out = pairing.task_deltas(trial, base)
    assert out["t.acc_correct_to_wrong"] == 2 / 5 and out["t.acc_wrong_to_correct"] == 1 / 5
    assert out["t.acc_delta"] == pytest.approx(-1 / 5)
    assert out["t.acc_delta_stderr"] == pytest.approx(statistics.stdev([0, -1, 1, 0, -1]) / math.sqrt(5))
    # Not 0/1: a delta, no flips.
    out = pairing.task_deltas({("t", "ll"): {0: -1.5, 1: -2.0}}, {("t", "ll"): {0: -1.0, 1: -2.5}})
    assert out == {"t.ll_delta": 0.0, "t.ll_delta_stderr": pytest.approx(0.5)}


def test_samples_round_trip_and_a_tampered_file_is_refused():
    text = samples_csv({"t": [{"doc_id": 0, "metrics": ["acc"], "acc": 1.0, "filter": "none"},
                              {"doc_id": 1, "metrics": ["acc", "ppl"], "acc": False, "ppl": (-3.0, 2)}]})
    assert pairing.parse_samples(text) == {("t", "acc"): {0: 1.0, 1: 0.0}}
    for bad in (text.replace("t,1,", "t,0,"), text.replace("1.0", "inf"), text.replace("t,0", "t;rm,0"),
                text.replace("task,doc_id", "doc_id,task"), text.replace("t,1,", "t,-1,"),
                text.replace("t,1,", "t,\u0661,"), text.replace("1.0", " 1_0.0")):
        with pytest.raises(ValueError, match="task_samples.csv"):
            pairing.parse_samples(bad)


@pytest.mark.slow
def test_an_lm_eval_sweep_logs_task_metrics_with_stderr_and_the_report_counts_flips(run_cli, tmp_path):
    proc = run_cli("run", "-m", "dtype=bf16,int4", "eval=lm_eval", "eval.task_limit=16", "debug=fast",
                   timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SUMMARY.search(proc.stdout).group(2, 3) == ("2", "2"), proc.stdout
    client, _, runs = runs_by_key(tmp_path / "mlflow.db")
    by_dtype = {r[0].data.params["dtype.name"]: r[0] for r in runs.values()}
    for run in by_dtype.values():
        m = run.data.metrics
        assert 0 <= m["stdlib_next_word.acc"] <= 1 and 0 < m["stdlib_next_word.acc_stderr"] < 0.2
        assert m["stdlib_rolling.bits_per_byte"] > 0 and 0 < m["stdlib_rolling.bits_per_byte_stderr"] < 1
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"task_samples.csv", "eval_windows.csv"}
    int4 = by_dtype["int4"].data.metrics
    flips = int4["stdlib_next_word.acc_correct_to_wrong"], int4["stdlib_next_word.acc_wrong_to_correct"]
    assert all(0 <= f <= 1 for f in flips)
    assert int4["stdlib_next_word.acc_delta"] == pytest.approx(flips[1] - flips[0])  # every flip moves the mean
    assert by_dtype["bf16"].data.metrics["stdlib_next_word.acc_correct_to_wrong"] == 0  # itself
