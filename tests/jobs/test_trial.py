"""jobs.trial.run without Ray, on the tiny model built from its config."""

import pytest
import torch

from jobs import trial
from jobs.spec import Status, TrialSpec
from orchestrator.plan import trial_spec
from tests.helpers import compose

FAST = ("debug=fast", "eval.max_tokens=4096")  # the orderings below need 4,096 tokens to hold


def _run(*overrides):
    return trial.run(trial_spec(compose(*overrides, *FAST), overrides))


@pytest.fixture(scope="module")
def results(tiny_model_cfg):
    return {d: _run(f"dtype={d}") for d in ("bf16", "int8", "int4")}


def test_every_dtype_finishes_with_timing_and_accuracy(results):
    for name, r in results.items():
        assert r.status == Status.FINISHED, (name, r.reason, r.artifacts.get("traceback.txt"))
        m = r.metrics
        assert m["prefill_tokens_per_s"] > 0 and m["decode_tokens_per_s"] > 0
        assert m["prefill_latency_p90_ms"] >= m["prefill_latency_p50_ms"] > 0
        assert m["peak_memory_mb"] > 0 and m["weight_bytes"] > 0
        assert 1 < m["perplexity"] < 2048, "the trained tiny model must beat a uniform guess over its vocab"
        assert 0 <= m["top1_agreement"] <= 1
        assert "trial.log" in r.artifacts and "latency_ms.json" in r.artifacts
        assert m["eval_windows"] == 16 and m["nll_stderr"] > 0 and m["perplexity_stderr"] > 0
        assert m["kl_divergence_max"] >= m["kl_divergence_p99_9"] >= m["kl_divergence_p50"] >= 0
        assert r.artifacts["eval_windows.csv"].count("\n") == 17


def test_the_trials_share_one_reference(results):
    folders = {r.env["reference"].split()[0] for r in results.values()}
    assert len(folders) == 1  # the same model, dtype and eval windows: computed once on this machine
    assert sum("(computed)" in r.env["reference"] for r in results.values()) <= 1


def test_kl_divergence_grows_as_bits_shrink(results):
    kl = {d: r.metrics["kl_divergence"] for d, r in results.items()}
    assert kl["int4"] > kl["int8"] > 0
    assert results["int4"].metrics["top1_agreement"] < results["int8"].metrics["top1_agreement"]


def test_quantized_trials_report_layers_and_packed_bytes(results):
    int4, int8 = results["int4"].metrics, results["int8"].metrics
    assert int4["bits_per_element"] == pytest.approx(4 + 32 / 128)
    assert int8["bits_per_element"] == pytest.approx(8 + 32 / 256, rel=0.02)
    assert int4["quantized_layers"] == int8["quantized_layers"] == 14  # 7 linears x 2 layers; lm_head skipped
    assert int4["layer_sqnr_db_min"] < int8["layer_sqnr_db_min"]
    assert results["int4"].artifacts["layers.csv"].startswith(
        "layer,shape,format,method,bytes,bits_per_element,sqnr_db,relative_error,max_abs_error\r\n")


@pytest.mark.parametrize("dtype,bits", [("fp8_e4m3", 8 + 32 / 256), ("fp6_e3m2", 6 + 32 / 256), ("mxfp4", 4.25),
                                        ("nvfp4", 4.5), ("mxint8", 8.25)])
def test_every_kind_of_format_runs_as_a_trial(tiny_model_cfg, dtype, bits):
    r = _run(f"dtype={dtype}")
    assert r.status == Status.FINISHED, (r.reason, r.artifacts.get("traceback.txt"))
    assert r.metrics["bits_per_element"] == pytest.approx(bits, rel=0.01)
    assert 0 < r.metrics["kl_divergence"] < 1 and r.metrics["layer_sqnr_db_min"] > 10


def test_quantizing_activations_and_kv_cache_adds_error(tiny_model_cfg):
    kl = {q: _run("dtype=mxfp4", f"quant={q}").metrics["kl_divergence"]
          for q in ("weight_only", "w_a_dynamic", "w_a_kv", "kv_cache")}
    assert kl["w_a_kv"] > kl["w_a_dynamic"] > kl["weight_only"] > 0
    assert kl["kv_cache"] > 0


# Triton's interpreter runs a kernel call in about a second: keep these trials to a few calls per layer.
TRITON_FAST = ("kernel=triton", "bench.prompt_len=8", "bench.decode_tokens=1", "bench.warmup=0", "bench.repeats=1",
               "eval.seq_len=16", "eval.max_tokens=32", "eval.batch_size=2")


def _run_triton(*overrides):
    return trial.run(trial_spec(compose(*overrides, *TRITON_FAST), overrides))


@pytest.mark.slow  # a whole trial through the Triton interpreter: ~45 s
def test_triton_kernel_trial_is_checked_against_the_reference_then_timed(tiny_model_cfg):
    r = _run_triton("dtype=int4")
    assert r.status == Status.FINISHED, (r.reason, r.artifacts.get("traceback.txt"))
    assert 0 < r.metrics["kernel_relative_error_max"] < 2e-3
    assert r.artifacts["kernel_check.csv"].startswith("layer,shape,format,relative_error,tolerance")
    assert r.metrics["decode_tokens_per_s"] > 0


def test_a_kernel_that_computes_the_wrong_thing_fails_before_timing(tiny_model_cfg, monkeypatch):
    from kernels import registry

    def off_by_a_bit(x, weight, bias, input_knobs):
        return registry.torch_reference(x, weight, bias, input_knobs) * 1.01

    monkeypatch.setitem(registry.KERNELS, "triton", off_by_a_bit)
    r = _run_triton("dtype=int8")
    assert r.status == Status.FAILED and r.reason.startswith("KernelMismatch: kernel triton on layer")
    assert "exceeds the tolerance" in r.reason
    assert "prefill_tokens_per_s" not in r.metrics, "a wrong kernel must not be timed"


def test_a_format_triton_does_not_implement_is_unsupported(tiny_model_cfg):
    r = _run_triton("dtype=fp6_e2m3")
    assert r.status == Status.UNSUPPORTED and "no triton kernel for fp6_e2m3" in r.reason


def test_torchao_kernel_trial_is_gated_and_timed(tiny_model_cfg):
    r = _run("dtype=int8", "kernel=torchao")
    assert r.status == Status.FINISHED, (r.reason, r.artifacts.get("traceback.txt"))
    assert r.metrics["kernel_relative_error_max"] < 1e-5  # fp32 model: the same codes and scales
    assert r.metrics["decode_tokens_per_s"] > 0


def test_a_trial_that_raises_is_failed_with_its_traceback(tiny_model_cfg):
    r = _run("dtype=int4", "dtype.group_size=512")  # allowed, but divides none of the tiny model's layers
    assert r.status == Status.FAILED
    assert "group_size=512 does not divide" in r.reason
    assert "Traceback" in r.artifacts["traceback.txt"] and "trial.log" in r.artifacts


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_unsupported_not_a_crash(tiny_model_cfg):
    r = _run("device=cuda")
    assert r.status == Status.UNSUPPORTED and "no CUDA GPU" in r.reason


def test_missing_local_model_path_fails_with_the_path():
    r = trial.run(TrialSpec("k", {**trial_spec(compose(*FAST), ()).config,
                                  "model": {"name": "m", "source": "path", "path": "/nonexistent/model",
                                            "dtype": "float32", "trust_remote_code": False, "build": None}}))
    assert r.status == Status.FAILED and "/nonexistent/model" in r.reason


def test_lm_eval_tasks_on_vllm_are_unsupported_before_any_model_loads():
    r = _run("backend=vllm", "eval=lm_eval")
    assert r.status == Status.UNSUPPORTED and r.reason.startswith("eval.tasks (lm-evaluation-harness) runs on backend=hf")


CALIB = ("calib.num_sequences=16", "calib.seq_len=128")


@pytest.mark.slow  # three trials that calibrate: ~40 s
def test_a_quantized_model_is_reused_by_trials_with_its_quantization_and_no_others(tiny_model_cfg):
    import shutil

    from jobs import quantized_cache

    for seed in (5, 6):  # stored by an earlier run of this test, where the test cache persists
        spec = trial_spec(compose("dtype=int4", "method=gptq", f"calib.seed={seed}", *CALIB, *FAST), [])
        device = trial.select_device(spec.settings.device)
        shutil.rmtree(quantized_cache.folder(spec.settings, device), ignore_errors=True)
    first = _run("dtype=int4", "method=gptq", "calib.seed=5", *CALIB)
    other_bench = _run("dtype=int4", "method=gptq", "calib.seed=5", "bench.batch_size=2", *CALIB)
    other_calib = _run("dtype=int4", "method=gptq", "calib.seed=6", *CALIB)
    for r in (first, other_bench, other_calib):
        assert r.status == Status.FINISHED, (r.reason, r.artifacts.get("traceback.txt"))
    folder = first.env["quantized_model"].split()[0]
    assert first.env["quantized_model"] == f"{folder} (quantized)" and first.metrics["quantized_model_reused"] == 0
    assert other_bench.env["quantized_model"] == f"{folder} (reused)"
    assert other_bench.metrics["quantized_model_reused"] == 1
    assert other_bench.metrics["quantize_s"] == first.metrics["quantize_s"]  # the method's time, as stored
    assert other_bench.metrics["quantize_load_s"] < first.metrics["quantize_s"]
    assert other_bench.metrics["kl_divergence"] == first.metrics["kl_divergence"]  # the same codes
    assert other_bench.artifacts["layers.csv"] == first.artifacts["layers.csv"]
    assert other_calib.env["quantized_model"].endswith("(quantized)")
    assert other_calib.env["quantized_model"].split()[0] != folder
    # The method's per-layer record: GPTQ's output error on the calibration inputs, beside RTN's.
    header = first.artifacts["layers.csv"].splitlines()[0]
    assert header.endswith("output_error,output_error_rtn,input_scale")
    assert first.metrics["layer_output_error_mean"] < first.metrics["layer_output_error_rtn_mean"]


@pytest.mark.slow  # the Triton trial runs in the interpreter: ~90 s
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_static_fp8_activation_scales_run_through_the_reference_and_the_triton_kernel(tiny_model_cfg, kernel):
    r = (_run_triton if kernel == "triton" else _run)("dtype=fp8_e4m3", "quant=w_a_static", *CALIB)
    assert r.status == Status.FINISHED, (r.reason, r.artifacts.get("traceback.txt"))
    scales = [float(line.rsplit(",", 1)[1]) for line in r.artifacts["layers.csv"].splitlines()[1:]]
    assert len(scales) == 14 and all(s > 0 for s in scales)
    if kernel == "triton":
        assert r.metrics["kernel_relative_error_max"] < 2e-3  # the gate passed against the torch reference


@pytest.mark.slow  # four trials that calibrate: ~40 s
@pytest.mark.parametrize("method", [("method.scaling=awq", "method.clip=true"),
                                    ("method=gptq", "method.rotation=hadamard", "method.rotation_size=16")])
def test_a_transformed_model_is_stored_and_reused_whole(tiny_model_cfg, method):
    """A scaling or a rotation rewrites the norms, embeddings and unquantized layers too: a reused model
    is the same model (the same KL to the last bit), with its online rotations."""
    import shutil

    from jobs import quantized_cache

    overrides = ("dtype=int4", "quant=w_a_kv", *method, *CALIB)
    spec = trial_spec(compose(*overrides, *FAST), [])
    shutil.rmtree(quantized_cache.folder(spec.settings, trial.select_device(spec.settings.device)), ignore_errors=True)
    first, again = _run(*overrides), _run(*overrides, "bench.batch_size=2")
    for r in (first, again):
        assert r.status == Status.FINISHED, (r.reason, r.artifacts.get("traceback.txt"))
    assert again.metrics["quantized_model_reused"] == 1
    assert again.metrics["kl_divergence"] == first.metrics["kl_divergence"]
    assert again.artifacts["layers.csv"] == first.artifacts["layers.csv"]
    if "method.scaling=awq" in method:  # the layer record says what each transform chose
        header = first.artifacts["layers.csv"].splitlines()[0].split(",")
        assert {"awq_alpha", "awq_gain", "clip_ratio_mean"} <= set(header)


def test_every_trial_is_held_against_the_roofline_of_this_nodes_measured_peaks(results):
    import json

    for name, r in results.items():
        m = r.metrics
        for phase in ("prefill", "decode"):
            assert 0 < m[f"{phase}_bandwidth_fraction"] <= 1 and 0 < m[f"{phase}_flops_fraction"] <= 1, (name, m)
            assert r.env[f"{phase}_bound"] in ("memory", "compute")
            fractions = (m[f"{phase}_bandwidth_fraction"], m[f"{phase}_flops_fraction"])
            assert m[f"{phase}_roofline_fraction"] == max(fractions)
        peaks = json.loads(r.artifacts["peaks.json"])
        assert peaks["bandwidth_bytes_per_s"] > 0 and {"fp32", "bf16"} <= set(peaks["flops_per_s"]) and peaks["how"]
    decode = {d: r.metrics["decode_bytes"] for d, r in results.items()}
    assert decode["int4"] < decode["int8"] < decode["bf16"]  # weights at their stored size
