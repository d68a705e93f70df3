"""Accuracy metrics: the top-k form an engine's log-probs allow against the dense form, and the
uncertainty of every metric."""

import csv
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jobs.evaluate import TokenScores, accuracy_metrics, score_dense, score_top_k, windows_csv


def _logits(seed: int, shape=(3, 9, 50), temperature: float = 0.5):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) / temperature


@pytest.fixture
def case():
    ref = F.log_softmax(_logits(0), -1)
    quant = F.log_softmax(_logits(0) + 0.3 * _logits(1), -1)  # a perturbed copy of the reference
    windows = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(2))
    return ref, quant, windows


def _dense(quant, windows, ref):
    return accuracy_metrics(score_dense(quant, windows[:, 1:], ref))


def _top_k(logp, windows, k, ref):
    top_logp, top_ids = logp.topk(k, dim=-1)
    target = logp.gather(-1, windows[:, 1:].unsqueeze(-1)).squeeze(-1)
    return accuracy_metrics(score_top_k(target, top_ids, top_logp, windows[:, 1:], ref))


def test_over_the_whole_vocabulary_the_top_k_form_is_the_dense_one(case):
    ref, quant, windows = case
    dense = _dense(quant, windows, ref)
    top = _top_k(quant, windows, 50, ref)
    assert top.keys() == dense.keys()
    for name in dense:
        assert top[name] == pytest.approx(dense[name], rel=1e-5, abs=1e-7), name


def test_a_shorter_top_k_keeps_perplexity_and_top1_and_bounds_kl_from_below(case):
    ref, quant, windows = case
    dense = _dense(quant, windows, ref)
    kls = []
    for k in (1, 5, 20, 50):
        top = _top_k(quant, windows, k, ref)
        assert top["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-6)
        assert top["top1_agreement"] == dense["top1_agreement"]
        kls.append(top["kl_divergence"])
    # Coarse-graining never adds divergence, and a finer partition never removes any.
    assert 0 <= kls[0] <= kls[1] <= kls[2] <= kls[3] == pytest.approx(dense["kl_divergence"], rel=1e-5)
    assert kls[2] > 0.5 * dense["kl_divergence"]


def test_identical_distributions_have_zero_kl_at_any_k(case):
    ref, _, windows = case
    for k in (3, 50):
        top = _top_k(ref, windows, k, ref)
        assert top["kl_divergence"] == pytest.approx(0, abs=1e-7) and top["top1_agreement"] == 1  # float32 rounding
        assert top["kl_divergence_max"] == pytest.approx(0, abs=1e-6)


def test_near_zero_kl_of_peaked_distributions_is_not_inflated_by_rounding():
    """bf16 against bf16: a tiny true KL, where float32 rounding of the rest mass used to dominate."""
    logits = _logits(3, shape=(2, 16, 4096), temperature=1 / 30)
    ref = F.log_softmax(logits, -1)
    quant = F.log_softmax(logits + 1e-3 * _logits(4, shape=(2, 16, 4096)), -1)
    windows = torch.randint(0, 4096, (2, 17), generator=torch.Generator().manual_seed(5))
    dense = _dense(quant, windows, ref)["kl_divergence"]
    for k in (20, 4096):
        top = _top_k(quant, windows, k, ref)["kl_divergence"]
        assert top <= dense * 1.001 + 1e-12, (k, top, dense)
    assert top == pytest.approx(dense, rel=1e-3)


def _synthetic(windows=4000, length=8, seed=0, window_sd=0.3, token_sd=1.0, p_top1=0.8):
    """Scores with a known variance: a per-window offset shared by its tokens, plus per-token noise."""
    gen = torch.Generator().manual_seed(seed)
    nll = 2.0 + window_sd * torch.randn(windows, 1, generator=gen) + token_sd * torch.randn(windows, length, generator=gen)
    kl = torch.rand(windows, length, generator=gen).pow(4)
    top1 = (torch.rand(windows, length, generator=gen) < p_top1).float()
    return TokenScores(nll=nll, ref_nll=nll - 0.1, kl=kl, top1=top1)


def test_standard_errors_match_the_known_variance_over_windows():
    windows, length, window_sd, token_sd, p = 4000, 8, 0.3, 1.0, 0.8
    m = accuracy_metrics(_synthetic(windows, length, window_sd=window_sd, token_sd=token_sd, p_top1=p))
    # A window's mean NLL varies as window_sd^2 + token_sd^2 / length; 4,000 windows pin the
    # estimated standard deviation to about 1.1%.
    assert m["nll_stderr"] == pytest.approx(math.sqrt((window_sd ** 2 + token_sd ** 2 / length) / windows), rel=0.05)
    assert m["top1_agreement_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (windows * length)), rel=0.05)
    assert m["top1_agreement"] == pytest.approx(p, abs=4 * m["top1_agreement_stderr"])
    # A per-token standard error would miss the shared offset: the windows' is the larger.
    assert m["nll_stderr"] > 1.2 * math.sqrt((window_sd ** 2 + token_sd ** 2) / (windows * length))
    assert m["perplexity_stderr"] == pytest.approx(m["perplexity"] * m["nll_stderr"], rel=1e-12)


def test_the_standard_error_covers_the_true_mean_about_95_percent_of_the_time():
    covered = [abs(accuracy_metrics(_synthetic(200, 8, seed=s))["nll"] - 2.0)
               <= 1.96 * accuracy_metrics(_synthetic(200, 8, seed=s))["nll_stderr"] for s in range(200)]
    assert 0.90 <= sum(covered) / len(covered) <= 0.99


def test_kl_percentiles_and_means_are_numpys():
    scores = _synthetic(300, 7, seed=3)
    m = accuracy_metrics(scores)
    kl = scores.kl.double().numpy().ravel()
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99_9", 99.9)):
        assert m[f"kl_divergence_{name}"] == np.percentile(kl, q)
    assert m["kl_divergence_max"] == kl.max()
    assert m["kl_divergence"] == pytest.approx(kl.mean(), rel=1e-12)
    window_means = scores.kl.double().mean(-1).numpy()
    assert m["kl_divergence_stderr"] == pytest.approx(np.std(window_means, ddof=1) / np.sqrt(300), rel=1e-12)
    assert m["eval_tokens"] == 2100 and m["eval_windows"] == 300


def test_one_window_has_no_standard_error():
    assert math.isnan(accuracy_metrics(_synthetic(1, 8))["nll_stderr"])


def test_the_per_window_file_holds_each_windows_means():
    scores = _synthetic(5, 4, seed=1)
    rows = list(csv.DictReader(io.StringIO(windows_csv(scores))))
    assert [r["window"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert list(rows[0]) == ["window", "nll", "reference_nll", "kl_divergence", "top1_agreement"]
    assert float(rows[2]["nll"]) == scores.nll[2].double().mean().item()  # repr: every bit survives
