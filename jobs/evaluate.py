"""Accuracy on a text: perplexity, and KL divergence / top-1 agreement against reference logits.

The text is tokenised once and cut into non-overlapping windows of ``eval.seq_len``
tokens, at most ``eval.max_tokens`` in all. The reference is the unquantized model's
log-probabilities on the same windows, kept on the CPU in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from jobs import data
from jobs.config import EvalConfig


def eval_windows(tokenizer, eval_cfg: EvalConfig, max_positions: int) -> torch.Tensor:
    seq_len = eval_cfg.seq_len
    if seq_len > max_positions:
        raise ValueError(f"eval.seq_len={seq_len} exceeds the model's {max_positions} positions")
    ids = tokenizer(data.load_text(eval_cfg.text, "eval"))["input_ids"][: eval_cfg.max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"eval text {eval_cfg.text!r} has {len(ids)} tokens, fewer than eval.seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.inference_mode()
def log_probs(model, windows: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """fp32 log-probabilities of every next token, [windows, seq_len - 1, vocab], on the CPU."""
    out = []
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch.to(device), use_cache=False).logits[:, :-1]
        out.append(F.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out)


def _nll(logp: torch.Tensor, targets: torch.Tensor) -> float:
    return -logp.gather(-1, targets.unsqueeze(-1)).mean().item()


def _metrics(nll: float, kl: float, top1: float, targets: torch.Tensor, ref_logp: torch.Tensor) -> dict:
    # The reference's own perplexity, to set beside the baseline trial's (they differ when the
    # baseline's dtype is not the model's).
    return {"perplexity": math.exp(nll), "nll": nll, "kl_divergence": kl, "top1_agreement": top1,
            "reference_perplexity": math.exp(_nll(ref_logp, targets)), "eval_tokens": float(targets.numel())}


def accuracy_metrics(logp: torch.Tensor, windows: torch.Tensor, ref_logp: torch.Tensor) -> dict:
    targets = windows[:, 1:]
    # KL(reference || quantized) per token, averaged over tokens.
    kl = F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1).mean().item()
    top1 = (logp.argmax(-1) == ref_logp.argmax(-1)).float().mean().item()
    return _metrics(_nll(logp, targets), kl, top1, targets, ref_logp)


FLOAT32_ROUNDING = 1e-7  # how far float32 probabilities summed over a vocabulary may miss 1


def top_k_accuracy_metrics(target_logp: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor,
                           windows: torch.Tensor, ref_logp: torch.Tensor) -> dict:
    """The same metrics from what an engine returns per position: the log-prob of the actual
    next token ``[windows, seq_len - 1]`` and its k most likely tokens, best first, with their
    log-probs ``[windows, seq_len - 1, k]``.

    Perplexity and top-1 agreement are exact. KL is taken between the two distributions
    coarse-grained to {each of the engine's top-k tokens, all the rest}: never more than the
    full KL (data processing inequality), equal to it when k is the whole vocabulary.
    """
    targets = windows[:, 1:]
    ref_top = ref_logp.gather(-1, top_ids).double()
    q_top = top_logp.double()
    kl_top = (ref_top.exp() * (ref_top - q_top)).sum(-1)
    # The reference's rest is summed over the rest itself (1 - sum(top) would leave float32
    # rounding, ~1e-7, where the rest is empty); the engine's can only be 1 - sum(top), so it is
    # taken no smaller than that rounding (which keeps the term a lower bound).
    ref_rest = torch.stack([torch.logsumexp(w.scatter(-1, ids, float("-inf")).double(), -1).exp()
                            for w, ids in zip(ref_logp, top_ids)])
    q_rest = (1 - q_top.exp().sum(-1)).clamp(min=FLOAT32_ROUNDING)
    kl_rest = torch.where(ref_rest > 0, ref_rest * (ref_rest.clamp(min=1e-300).log() - q_rest.log()), 0.0)
    kl = (kl_top + kl_rest).mean().item()
    top1 = (top_ids[..., 0] == ref_logp.argmax(-1)).float().mean().item()
    return _metrics(-target_logp.double().mean().item(), kl, top1, targets, ref_logp)
