"""Accuracy metrics: the top-k form an engine's log-probs allow against the dense form."""

import pytest
import torch
import torch.nn.functional as F

from jobs.evaluate import accuracy_metrics, top_k_accuracy_metrics


def _logits(seed: int, shape=(3, 9, 50), temperature: float = 0.5):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) / temperature


@pytest.fixture
def case():
    ref = F.log_softmax(_logits(0), -1)
    quant = F.log_softmax(_logits(0) + 0.3 * _logits(1), -1)  # a perturbed copy of the reference
    windows = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(2))
    return ref, quant, windows


def _top_k(logp, windows, k):
    top_logp, top_ids = logp.topk(k, dim=-1)
    target = logp.gather(-1, windows[:, 1:].unsqueeze(-1)).squeeze(-1)
    return target, top_ids, top_logp


def test_over_the_whole_vocabulary_the_top_k_form_is_the_dense_one(case):
    ref, quant, windows = case
    dense = accuracy_metrics(quant, windows, ref)
    top = top_k_accuracy_metrics(*_top_k(quant, windows, 50), windows, ref)
    assert top.keys() == dense.keys()
    for name in dense:
        assert top[name] == pytest.approx(dense[name], rel=1e-5, abs=1e-7), name


def test_a_shorter_top_k_keeps_perplexity_and_top1_and_bounds_kl_from_below(case):
    ref, quant, windows = case
    dense = accuracy_metrics(quant, windows, ref)
    kls = []
    for k in (1, 5, 20, 50):
        top = top_k_accuracy_metrics(*_top_k(quant, windows, k), windows, ref)
        assert top["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-6)
        assert top["top1_agreement"] == dense["top1_agreement"]
        kls.append(top["kl_divergence"])
    # Coarse-graining never adds divergence, and a finer partition never removes any.
    assert 0 <= kls[0] <= kls[1] <= kls[2] <= kls[3] == pytest.approx(dense["kl_divergence"], rel=1e-5)
    assert kls[2] > 0.5 * dense["kl_divergence"]


def test_identical_distributions_have_zero_kl_at_any_k(case):
    ref, _, windows = case
    for k in (3, 50):
        top = top_k_accuracy_metrics(*_top_k(ref, windows, k), windows, ref)
        assert top["kl_divergence"] == pytest.approx(0, abs=1e-7) and top["top1_agreement"] == 1  # float32 rounding


def test_near_zero_kl_of_peaked_distributions_is_not_inflated_by_rounding():
    """bf16 against bf16: a tiny true KL, where float32 rounding of the rest mass used to dominate."""
    logits = _logits(3, shape=(2, 16, 4096), temperature=1 / 30)
    ref = F.log_softmax(logits, -1)
    quant = F.log_softmax(logits + 1e-3 * _logits(4, shape=(2, 16, 4096)), -1)
    windows = torch.randint(0, 4096, (2, 17), generator=torch.Generator().manual_seed(5))
    dense = accuracy_metrics(quant, windows, ref)["kl_divergence"]
    for k in (20, 4096):
        top = top_k_accuracy_metrics(*_top_k(quant, windows, k), windows, ref)["kl_divergence"]
        assert top <= dense * 1.001 + 1e-12, (k, top, dense)
    assert top == pytest.approx(dense, rel=1e-3)
