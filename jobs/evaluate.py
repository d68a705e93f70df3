"""Accuracy on a text: perplexity, and KL divergence / top-1 agreement against the reference,
each with its uncertainty.

The text is tokenised once and cut into non-overlapping windows of ``eval.seq_len``
tokens, at most ``eval.max_tokens`` in all. The reference is the unquantized model's
log-probabilities on the same windows (``jobs/reference.py``), read in chunks of windows;
the quantized model is scored batch by batch against it, so evaluation holds at most
``eval.batch_size`` windows of ``vocab``-wide rows at a time, whatever ``eval.max_tokens``.

Every metric is a mean over scored tokens. Its standard error is taken over windows: the
tokens of one window share their context, so their errors are correlated and a per-token
standard error would be too small; windows are disjoint stretches of text, taken as
independent draws. Each window scores ``seq_len - 1`` tokens, so the mean over tokens is the
mean of the window means and its standard error is their sample standard deviation over
sqrt(windows): what a bootstrap over windows estimates, without the bootstrap's own noise.
Perplexity's follows by the delta method (``exp(nll) * se(nll)``). KL percentiles are over
tokens, as llama.cpp's perplexity tool reports them (``--kl-divergence``).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from jobs import data
from jobs.config import EvalConfig
from jobs.spec import EVAL_WINDOW_COLUMNS, EVAL_WINDOWS_FILE, TrialResult

# (metric suffix, percentile of the per-token KL)
KL_PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9), ("max", 100.0))
FLOAT32_ROUNDING = 1e-7  # how far float32 probabilities summed over a vocabulary may miss 1


def eval_windows(tokenizer, eval_cfg: EvalConfig, max_positions: int) -> torch.Tensor:
    seq_len = eval_cfg.seq_len
    if seq_len > max_positions:
        raise ValueError(f"eval.seq_len={seq_len} exceeds the model's {max_positions} positions")
    ids = tokenizer(data.load_text(eval_cfg.text, "eval"))["input_ids"][: eval_cfg.max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"eval text {eval_cfg.text!r} has {len(ids)} tokens, fewer than eval.seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass
class TokenScores:
    """Per scored token, ``[windows, seq_len - 1]``: what every accuracy metric is made of."""
    nll: torch.Tensor      # -log q(actual next token), the quantized model's
    ref_nll: torch.Tensor  # -log p(actual next token), the reference's
    kl: torch.Tensor       # KL(p || q) at this position
    top1: torch.Tensor     # 1.0 where q's most likely token is p's

    @classmethod
    def cat(cls, parts: list["TokenScores"]) -> "TokenScores":
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def window_means(self) -> dict[str, np.ndarray]:
        """Each score's mean per window, float64, by the name of its metric (EVAL_WINDOW_COLUMNS)."""
        scores = (self.nll, self.ref_nll, self.kl, self.top1)
        return {name: s.double().mean(-1).numpy() for name, s in zip(EVAL_WINDOW_COLUMNS[1:], scores)}


def log_probs(model, windows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """fp32 log-probabilities of every next token of ``windows``, ``[n, seq_len - 1, vocab]``, on ``device``."""
    logits = model(input_ids=windows.to(device), use_cache=False).logits[:, :-1].float()
    # In place: one vocab-wide buffer per window outlives this, not two.
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def score_dense(logp: torch.Tensor, targets: torch.Tensor, ref_logp: torch.Tensor) -> TokenScores:
    """Scores from full rows of log-probs, the quantized model's and the reference's."""
    # A window at a time: KL's elementwise temporaries are one window's, not the batch's.
    kl = torch.stack([F.kl_div(q, p, log_target=True, reduction="none").sum(-1) for q, p in zip(logp, ref_logp)])
    return TokenScores(nll=-logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
                       ref_nll=-ref_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), kl=kl,
                       top1=(logp.argmax(-1) == ref_logp.argmax(-1)).float())


@torch.inference_mode()
def score_model(model, windows: torch.Tensor, batch_size: int, device: torch.device, reference) -> TokenScores:
    """Score ``model`` on ``windows`` against ``reference`` (``jobs.reference.Reference``), a batch at a time."""
    parts = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        ref = reference.read(start, start + len(batch)).to(device)
        scores = score_dense(log_probs(model, batch, device), batch[:, 1:].to(device), ref)
        parts.append(TokenScores(*(getattr(scores, f.name).cpu() for f in fields(TokenScores))))
    return TokenScores.cat(parts)


def score_top_k(target_logp: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor,
                targets: torch.Tensor, ref_logp: torch.Tensor) -> TokenScores:
    """Scores from what an engine returns per position: the log-prob of the actual next token
    ``[n, seq_len - 1]`` and its k most likely tokens, best first, with their log-probs
    ``[n, seq_len - 1, k]``.

    NLL and top-1 agreement are exact. KL is taken between the two distributions
    coarse-grained to {each of the engine's top-k tokens, all the rest}: never more than the
    full KL (data processing inequality), equal to it when k is the whole vocabulary.
    """
    ref_top = ref_logp.gather(-1, top_ids).double()
    q_top = top_logp.double()
    kl_top = (ref_top.exp() * (ref_top - q_top)).sum(-1)
    # The reference's rest is summed over the rest itself (1 - sum(top) would leave float32
    # rounding, ~1e-7, where the rest is empty); the engine's can only be 1 - sum(top), so it is
    # taken no smaller than that rounding (which keeps the term a lower bound).
    ref_rest = torch.logsumexp(ref_logp.scatter(-1, top_ids, float("-inf")).double(), -1).exp()
    q_rest = (1 - q_top.exp().sum(-1)).clamp(min=FLOAT32_ROUNDING)
    kl_rest = torch.where(ref_rest > 0, ref_rest * (ref_rest.clamp(min=1e-300).log() - q_rest.log()), 0.0)
    return TokenScores(nll=-target_logp.double(), ref_nll=-ref_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
                       kl=kl_top + kl_rest, top1=(top_ids[..., 0] == ref_logp.argmax(-1)).float())


def score_engine(target_logp: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, windows: torch.Tensor,
                 reference, batch_size: int) -> TokenScores:
    """:func:`score_top_k` over all windows, reading the reference ``batch_size`` windows at a time."""
    parts = []
    for start in range(0, len(windows), batch_size):
        stop = min(start + batch_size, len(windows))
        parts.append(score_top_k(target_logp[start:stop], top_ids[start:stop], top_logp[start:stop],
                                 windows[start:stop, 1:], reference.read(start, stop)))
    return TokenScores.cat(parts)


def mean_and_stderr(window_means: np.ndarray) -> tuple[float, float]:
    """The mean of equally weighted windows and its standard error (NaN with one window)."""
    n = len(window_means)
    mean = float(window_means.mean())
    return mean, float(window_means.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan


def accuracy_metrics(scores: TokenScores) -> dict[str, float]:
    """Every accuracy metric of a trial, each mean with its ``_stderr``."""
    means = scores.window_means()
    out: dict[str, float] = {}
    for name, values in means.items():
        out[name], out[f"{name}_stderr"] = mean_and_stderr(values)
    out["perplexity"] = math.exp(out["nll"])
    out["perplexity_stderr"] = out["perplexity"] * out["nll_stderr"]
    # The reference's own perplexity, to set beside the baseline trial's (they differ when the
    # baseline's dtype is not the model's).
    out["reference_perplexity"] = math.exp(out["reference_nll"])
    kl = scores.kl.double().numpy().ravel()
    for suffix, value in zip((s for s, _ in KL_PERCENTILES), np.percentile(kl, [q for _, q in KL_PERCENTILES])):
        out[f"kl_divergence_{suffix}"] = float(value)
    out["eval_tokens"] = float(scores.nll.numel())
    out["eval_windows"] = float(len(scores.nll))
    return out


def record(scores: TokenScores, result: TrialResult) -> None:
    """A trial's accuracy metrics, and its per-window means as ``eval_windows.csv`` (the report
    pairs them with the baseline's)."""
    result.metrics.update(accuracy_metrics(scores))
    result.artifacts[EVAL_WINDOWS_FILE] = windows_csv(scores)


def windows_csv(scores: TokenScores) -> str:
    """The per-window means (``eval_windows.csv``), which the report pairs with the baseline's."""
    means = scores.window_means()
    out = io.StringIO()
    out.write(",".join(EVAL_WINDOW_COLUMNS) + "\n")
    for i in range(len(scores.nll)):
        out.write(",".join([str(i), *(repr(float(v[i])) for v in means.values())]) + "\n")
    return out.getvalue()
