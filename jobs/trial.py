"""One trial: load -> quantize -> benchmark -> evaluate, as a pure function of its spec.

``run(spec)`` never raises for a problem of the trial itself: the result says FAILED (with
the traceback as an artifact) or UNSUPPORTED (with the reason). It needs no Ray.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import time
import traceback

import torch

from jobs import (bench, calibration, capability, environment, evaluate, models, peaks, perf_model, quantized_cache,
                  reference, tasks, vllm_backend)
from jobs.cache import build_once
from jobs.config import TrialConfig, layer_dtypes, uses_calibration
from jobs.quantize import QuantizedLayers, apply_dtype, check_kernel, weight_bytes
from jobs.spec import TASK_SAMPLES_FILE, Status, TrialResult, TrialSpec, failure_reason
from kernels.catalog import Unsupported

log = logging.getLogger(__name__)
BACKENDS = ("hf", "vllm")


def select_device(requested: str) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        raise Unsupported("device=cuda but no CUDA GPU is visible to this trial (give it resources.num_gpus)")
    return torch.device("cpu")


@contextlib.contextmanager
def _captured_log():
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield buffer
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(old_level)


def _table_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    columns = list(dict.fromkeys(k for row in rows for k in row))  # a transform's notes are on some layers only
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _layer_summary(rows: list[dict]) -> dict[str, float]:
    """The layers' error summary over the quantized ones, and their bits per weight element over all the
    rows (with per-layer rules, the layers a rule keeps unquantized count at the compute dtype's width)."""
    quantized = [r for r in rows if "sqnr_db" in r]
    if not quantized:
        return {}
    sqnr = [r["sqnr_db"] for r in quantized]
    elements = sum(8 * r["bytes"] / r["bits_per_element"] for r in rows)
    summary = {"quantized_layers": float(len(quantized)), "layer_sqnr_db_min": min(sqnr),
               "layer_sqnr_db_mean": sum(sqnr) / len(sqnr),
               "layer_relative_error_max": max(r["relative_error"] for r in quantized),
               "bits_per_element": 8 * sum(r["bytes"] for r in rows) / elements}
    for column in ("output_error", "output_error_rtn"):  # on calibration inputs, where the trial calibrated
        values = [r[column] for r in rows if column in r and not math.isnan(r[column])]
        if values:
            summary[f"layer_{column}_mean"] = sum(values) / len(values)
            summary[f"layer_{column}_max"] = max(values)
    return summary


class KernelMismatch(Exception):
    """The kernel's numbers disagree with the reference: the trial must not be timed."""


def _gate_kernel(model, cfg: TrialConfig, dtype: torch.dtype, result: TrialResult) -> None:
    """Check the chosen kernel against the torch reference on the model's layer shapes."""
    name = cfg.kernel.name
    if name == "torch":
        return
    rows = check_kernel(model, name, dtype, cfg.seed)
    if not rows:
        return
    result.artifacts["kernel_check.csv"] = _table_csv(rows)
    worst = max(rows, key=lambda r: r["relative_error"])
    result.metrics["kernel_relative_error_max"] = worst["relative_error"]
    log.info("kernel %s vs reference: %s", name, rows)
    if not worst["relative_error"] <= worst["tolerance"]:  # NaN fails too
        raise KernelMismatch(f"kernel {name} on layer {worst['layer']} ({worst['shape']}): relative error "
                             f"{worst['relative_error']:.3g} against the torch reference exceeds the "
                             f"tolerance {worst['tolerance']:g} for {dtype}")


def _execute(spec: TrialSpec, result: TrialResult) -> None:
    cfg = spec.settings
    backend = cfg.backend.name
    if backend not in BACKENDS:
        raise Unsupported(f"backend {backend!r} is not available; available: {', '.join(BACKENDS)}")
    device = select_device(cfg.device)
    result.env.update(environment.capture(device))
    capability.check(cfg, device)
    torch.manual_seed(cfg.seed)

    # The reference: the unquantized model through transformers, whatever the backend; stored
    # once per node and shared (jobs/reference.py).
    model, tokenizer = models.load_model(cfg.model, device)
    windows = evaluate.eval_windows(tokenizer, cfg.eval, model.config.max_position_embeddings)
    log.info("reference: %s at %s on %s, %d eval windows", cfg.model.name, model.dtype, device, len(windows))
    ref, computed = reference.ensure_reference(model, cfg.model, windows, cfg.eval.batch_size, device)
    result.env["reference"] = f"{ref.folder.name} ({'computed' if computed else 'shared'})"
    if backend == "vllm":
        model_config = model.config
        del model  # the engine gets the device to itself
        if device.type == "cuda":
            torch.cuda.empty_cache()
        vllm_backend.run(cfg, windows, ref, model_config, device, result)
    else:
        _run_hf(model, tokenizer, cfg, windows, ref, device, result)


def _quantize(model, tokenizer, cfg: TrialConfig, compute_dtype: torch.dtype, device: torch.device,
              result: TrialResult) -> list[dict]:
    """Quantize ``model`` in place by the trial's method; a method that calibrates is run once per node
    and its result stored (jobs/quantized_cache.py). Records ``quantize_s``, the method's time."""
    started = time.perf_counter()
    if not uses_calibration(cfg):
        layers = apply_dtype(model, cfg, compute_dtype)
        if any(d.format is not None for d in layer_dtypes(cfg)):  # a plain cast quantizes nothing
            result.metrics["quantize_s"] = time.perf_counter() - started
        return layers
    folder = quantized_cache.folder(cfg, device)
    made: list[dict] = []

    def make(tmp) -> None:
        windows = calibration.calibration_windows(tokenizer, cfg.calib, cfg.eval.text,
                                                  model.config.max_position_embeddings)
        log.info("quantize: %s on %d calibration windows of %d tokens", cfg.method.name, *windows.shape)
        made.extend(apply_dtype(model, cfg, compute_dtype, calibration=windows))
        result.metrics["quantize_s"] = time.perf_counter() - started
        quantized_cache.save(tmp, QuantizedLayers.of(model, made, cfg), result.metrics["quantize_s"])

    if build_once(folder, quantized_cache.MANIFEST, make):
        layers = made
    else:  # made by an earlier trial on this node (or while this one waited for the lock)
        stored, result.metrics["quantize_s"] = quantized_cache.load(folder, device)
        layers = apply_dtype(model, cfg, compute_dtype, stored=stored)
        result.metrics["quantize_load_s"] = time.perf_counter() - started
    reused = not made
    result.metrics["quantized_model_reused"] = float(reused)
    result.env["quantized_model"] = f"{folder.name} ({'reused' if reused else 'quantized'})"
    log.info("quantized model %s: %s", folder, "reused" if reused else "quantized and stored")
    return layers


def _roofline(model_config, cfg: TrialConfig, device: torch.device, result: TrialResult) -> None:
    """The bench's prefill and decode step against this node's measured peaks (jobs/peaks.py): their
    bytes and FLOPs (jobs/perf_model.py), the time the roofline allows, which bound applies, and what
    fraction of the bandwidth and of the compute peak the measured times reached."""
    try:
        shape = perf_model.ModelShape.from_config(model_config.to_dict())
    except KeyError as e:  # not a Llama-style config: no cost model for it
        log.info("roofline: not modelled for %s (its config has no %s)", model_config.model_type, e)
        return
    node, record = peaks.node_peaks(device)
    result.artifacts["peaks.json"] = json.dumps(record, indent=2)
    fallback = perf_model.PRECISION[perf_model.compute_dtype(cfg)]
    metrics = result.metrics
    metrics["peak_bandwidth_bytes_per_s"] = node.bandwidth
    metrics.update({f"peak_flops_per_s_{p}": f for p, f in node.flops.items()})
    for phase, cost in zip(("prefill", "decode"), perf_model.trial_costs(cfg, shape)):
        measured = metrics[f"{phase}_latency_p50_ms"] / 1e3
        predicted = perf_model.roofline(cost, node, fallback)
        metrics.update(cost.metrics(phase))
        metrics[f"{phase}_predicted_ms"] = predicted.seconds * 1e3
        metrics[f"{phase}_roofline_fraction"] = predicted.seconds / measured
        metrics[f"{phase}_bandwidth_fraction"] = predicted.memory_s / measured
        metrics[f"{phase}_flops_fraction"] = predicted.compute_s / measured
        result.env[f"{phase}_bound"] = predicted.bound
    log.info("roofline: prefill %.3g ms predicted (%s-bound), %.3g measured; decode %.3g ms (%s-bound), %.3g",
             metrics["prefill_predicted_ms"], result.env["prefill_bound"], metrics["prefill_latency_p50_ms"],
             metrics["decode_predicted_ms"], result.env["decode_bound"], metrics["decode_latency_p50_ms"])


def _run_hf(model, tokenizer, cfg: TrialConfig, windows: torch.Tensor, ref: reference.Reference, device: torch.device,
            result: TrialResult) -> None:
    compute = cfg.dtype.compute_dtype
    compute_dtype = model.dtype if compute == "auto" else models.TORCH_DTYPES[compute]
    layers = _quantize(model, tokenizer, cfg, compute_dtype, device, result)
    _gate_kernel(model, cfg, compute_dtype, result)
    result.metrics["weight_bytes"] = float(weight_bytes(model))
    result.metrics.update(_layer_summary(layers))
    if layers:
        result.artifacts["layers.csv"] = _table_csv(layers)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    log.info("benchmark: %s", cfg.bench)
    timing, samples = bench.benchmark(model, cfg.bench, device, cfg.seed)
    result.metrics.update(timing)
    _roofline(model.config, cfg, device, result)
    result.artifacts["latency_ms.json"] = json.dumps(samples)

    log.info("evaluate: %s", cfg.eval)
    evaluate.record(evaluate.score_model(model, windows, cfg.eval.batch_size, device, ref), result)
    if cfg.eval.tasks:
        log.info("lm-eval tasks: %s", cfg.eval.tasks)
        metrics, result.artifacts[TASK_SAMPLES_FILE] = tasks.run_tasks(model, tokenizer, cfg.eval, device, cfg.seed)
        result.metrics.update(metrics)
    log.info("metrics: %s", result.metrics)


def run(spec: TrialSpec) -> TrialResult:
    result = TrialResult(trial_key=spec.trial_key, status=Status.RUNNING)
    started = time.perf_counter()
    with _captured_log() as trial_log:
        try:
            _execute(spec, result)
            result.status = Status.FINISHED
        except Unsupported as e:
            result.status, result.reason = Status.UNSUPPORTED, str(e)
        except Exception as e:
            result.status, result.reason = Status.FAILED, failure_reason(e)
            result.artifacts["traceback.txt"] = traceback.format_exc()
            log.error("trial failed: %s", result.reason)
    result.duration_s = time.perf_counter() - started
    result.artifacts["trial.log"] = trial_log.getvalue()
    return result
