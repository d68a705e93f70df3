"""Inference timing: prefill and decode throughput and latency, and peak memory.

Every timed region is bracketed by a device synchronise; warm-up iterations run first
and are not recorded. Prompts are random token ids: timing does not depend on content.
"""

from __future__ import annotations

import inspect
import resource
import statistics
import time

import torch
from transformers import DynamicCache

from jobs.config import BenchConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB: the peak resident set of this (fresh) worker process.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_prompts(vocab_size: int, batch: int, prompt_len: int, seed: int) -> torch.Tensor:
    """The bench's prompts: the same token ids for every backend of a seed."""
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def benchmark(model, bench: BenchConfig, device: torch.device, seed: int) -> tuple[dict, dict]:
    """(metrics, latency samples in ms) for prefill and per-token decode."""
    batch, prompt_len, new_tokens = bench.batch_size, bench.prompt_len, bench.decode_tokens
    prompt = random_prompts(model.config.vocab_size, batch, prompt_len, seed).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    prefill_ms = []
    for i in range(bench.warmup + bench.repeats):
        dt = _timed(lambda: model(input_ids=prompt, use_cache=False), device)
        if i >= bench.warmup:
            prefill_ms.append(dt * 1e3)

    # transformers renamed ``past_key_values`` to ``cache``; the cache object fills in place.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    decode_ms = []
    for i in range(bench.warmup + bench.repeats):
        cache = DynamicCache(config=model.config)
        token = model(input_ids=prompt, use_cache=True, **{cache_kw: cache}).logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(new_tokens):
            def step():
                nonlocal token
                logits = model(input_ids=token, use_cache=True, **{cache_kw: cache}).logits
                token = logits[:, -1:].argmax(-1)
            steps.append(_timed(step, device) * 1e3)
        if i >= bench.warmup:
            decode_ms.extend(steps)

    metrics = latency_metrics(prefill_ms, decode_ms, batch, prompt_len)
    metrics["peak_memory_mb"] = peak_memory_mb(device)
    return metrics, {"prefill_ms": prefill_ms, "decode_ms": decode_ms}


def latency_metrics(prefill_ms: list[float], decode_ms: list[float], batch: int, prompt_len: int) -> dict:
    """Every backend's timing metrics, from its samples: the latency of a prefill of ``batch``
    prompts of ``prompt_len`` tokens (time to first token) and of one decode step of the batch
    (time per output token); throughputs from their medians."""
    prefill_med, decode_med = statistics.median(prefill_ms), statistics.median(decode_ms)
    metrics = {"prefill_tokens_per_s": batch * prompt_len / (prefill_med / 1e3),
               "decode_tokens_per_s": batch / (decode_med / 1e3),
               "prefill_latency_p50_ms": prefill_med, "decode_latency_p50_ms": decode_med}
    for name, samples in (("prefill", prefill_ms), ("decode", decode_ms)):
        for q in (90, 99):
            metrics[f"{name}_latency_p{q}_ms"] = _percentile(samples, q)
    return metrics
