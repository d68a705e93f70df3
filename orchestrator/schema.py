"""The config schema: one dataclass per config group, registered in Hydra's ConfigStore.

Hydra type-checks every group against these while composing. Value rules that types
cannot express (ranges, choices) sit in each field's metadata and are checked by
:func:`validate`, so every bad value is refused before anything is submitted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from kernels.catalog import FORMATS, GRANULARITIES, KERNELS, OVERFLOWS, ROUNDINGS, SCALE_RULES
from orchestrator.errors import ConfigError

TORCH_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def rule(default: Any = MISSING, *, choices: Optional[tuple] = None, ge: Optional[float] = None,
         gt: Optional[float] = None, le: Optional[float] = None, **kwargs) -> Any:
    """A dataclass field with a value rule checked by :func:`validate`."""
    metadata = {k: v for k, v in (("choices", choices), ("ge", ge), ("gt", gt), ("le", le)) if v is not None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class TinyModelBuild:
    """How ``model.source=build`` builds and trains a small Llama."""
    train_text: str = "stdlib-docs"
    vocab_size: int = rule(2048, ge=256)
    hidden_size: int = rule(256, ge=16)
    intermediate_size: int = rule(768, ge=16)
    num_layers: int = rule(2, ge=1)
    num_heads: int = rule(4, ge=1)
    max_seq_len: int = rule(512, ge=16)
    train_steps: int = rule(400, ge=10)
    train_batch_size: int = rule(16, ge=1)
    train_seq_len: int = rule(128, ge=8)
    lr: float = rule(3e-3, gt=0)
    seed: int = rule(0, ge=0, le=2 ** 32 - 1)


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = rule("hub", choices=("hub", "path", "build"))
    path: Optional[str] = None  # HF hub id (source=hub) or a local directory (source=path)
    dtype: str = rule("bfloat16", choices=TORCH_DTYPE_NAMES)  # the unquantized reference's dtype
    trust_remote_code: bool = False
    build: Optional[TinyModelBuild] = None


@dataclass
class DtypeConfig:
    """A number format and its knobs (see kernels/formats.py). format=null: a plain cast."""
    name: str = MISSING
    compute_dtype: str = rule("auto", choices=("auto",) + TORCH_DTYPE_NAMES)  # auto: model.dtype
    format: Optional[str] = rule(None, choices=(None,) + tuple(FORMATS))
    granularity: str = rule("per_channel", choices=GRANULARITIES)
    group_size: int = rule(128, ge=1)
    rounding: str = rule("nearest", choices=ROUNDINGS)
    scale_rule: Optional[str] = rule(None, choices=(None,) + SCALE_RULES)  # None: the format's default
    overflow: str = rule("saturate", choices=OVERFLOWS)
    symmetric: bool = True


@dataclass
class QuantConfig:
    """The scheme: what the dtype's format is applied to."""
    name: str = MISSING
    weights: bool = True
    activations: bool = False  # dynamic, one scale per token
    kv_cache: bool = False     # keys and values, per token and head
    skip_layers: list[str] = rule(["lm_head"])  # names or fnmatch patterns kept unquantized


@dataclass
class KernelConfig:
    name: str = rule("torch", choices=KERNELS)


@dataclass
class VllmOptions:
    """backend=vllm: vLLM's offline engine (``vllm.LLM``); engine arguments not named here are vLLM's defaults."""
    # > 1: the trial's GPUs (resources.num_gpus, one Ray task, so one node) as vLLM worker processes.
    tensor_parallel_size: int = rule(1, ge=1)
    max_model_len: Optional[int] = rule(None, ge=2)  # None: what the bench and eval need
    enforce_eager: bool = False  # True: no torch.compile and no CUDA graphs (faster start, slower steps)
    # Fraction of device memory for weights, activations and the KV cache. None: 0.9 on a GPU;
    # on the CPU a KV cache sized to the trial's sequences (vLLM's fraction of a NUMA node's RAM
    # fails on small nodes).
    gpu_memory_utilization: Optional[float] = rule(None, gt=0, le=1)
    # Prompt log-probs per position for KL and top-1: the engine's top-k tokens (plus the
    # actual one). -1: the whole vocabulary (exact KL; slow for large vocabularies).
    logprobs_top_k: int = rule(256, ge=-1)
    throughput_requests: int = rule(64, ge=1)  # offline throughput: requests submitted at once


@dataclass
class NoopOptions:
    """backend=noop: no model work, for measuring the orchestrator's own overhead and for
    exercising scheduling and faults."""
    sleep_s: float = rule(0.0, ge=0)      # how long the trial sleeps
    allocate_gb: float = rule(0.0, ge=0)  # host memory the trial allocates (out-of-memory tests)


@dataclass
class BackendConfig:
    """The inference engine: hf (transformers + torch, eager), vllm, or noop.

    Each backend's options sit under its own name (``backend.vllm.enforce_eager``), so one
    override serves a sweep over backends; a trial's config keeps only its own backend's.
    """
    name: str = rule("hf", choices=("hf", "vllm", "noop"))
    vllm: VllmOptions = field(default_factory=VllmOptions)
    noop: NoopOptions = field(default_factory=NoopOptions)


@dataclass
class BenchConfig:
    batch_size: int = rule(1, ge=1)
    prompt_len: int = rule(128, ge=1)
    decode_tokens: int = rule(32, ge=1)
    warmup: int = rule(2, ge=0)
    repeats: int = rule(5, ge=1)


@dataclass
class EvalConfig:
    text: str = "stdlib-docs"  # a shipped text's name or a path to a UTF-8 file
    seq_len: int = rule(256, ge=2)
    max_tokens: int = rule(16384, ge=2)
    batch_size: int = rule(8, ge=1)


@dataclass
class ResourcesConfig:
    """What one trial asks of the cluster (Ray resources), and how long it may run.

    A trial is one Ray task, so its GPUs are always on one node (what a tensor-parallel
    trial needs); Ray sets CUDA_VISIBLE_DEVICES to exactly those GPUs.
    """
    # Upper bounds: what one Ray node could hold (Ray keeps resource amounts as fixed-point int64).
    num_cpus: float = rule(1.0, ge=0, le=100_000)
    num_gpus: float = rule(0.0, ge=0, le=1_000)
    memory_gb: Optional[float] = rule(None, gt=0, le=100_000)  # Ray's logical `memory` resource
    accelerator_type: Optional[str] = None         # e.g. H100, A100 (Ray's accelerator_type:<name>)
    timeout_s: Optional[float] = rule(None, gt=0)  # from the trial's start; then TIMEOUT, its worker killed


@dataclass
class ClusterConfig:
    name: str = "local"
    address: Optional[str] = None      # None: start an embedded local Ray
    num_cpus: Optional[int] = rule(None, ge=1)  # embedded Ray only; None: all cores
    max_retries: int = rule(3, ge=0)   # re-runs of a trial whose worker or node died (not of its own errors)
    max_concurrent_trials: Optional[int] = rule(None, ge=1)  # None: as many as the cluster fits
    # A trial that no node could ever hold is UNSUPPORTED at once, unless an autoscaler may add one.
    autoscaling: bool = False
    # One worker process per trial: its memory (and CUDA context) is freed when it ends.
    fresh_worker_per_trial: bool = True


@dataclass
class TrackingConfig:
    # None: MLflow's MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
    uri: Optional[str] = None
    # Writes that fail (server unreachable) are retried; at the sweep's end the driver waits
    # this long for them to land before giving up.
    flush_timeout_s: float = rule(600.0, gt=0)
    # Sample MLflow's system metrics (CPU, memory; GPU utilisation and memory with nvidia-ml-py)
    # on each trial's worker this often, into the trial's run. None: off.
    system_metrics_interval_s: Optional[float] = rule(None, gt=0)


@dataclass
class SweepConfig:
    name: str = "default"  # the MLflow experiment that holds the sweep
    id: Optional[str] = None  # None: a fresh swp-xxxxxx (`orchestrator submit` picks it up front)
    # Take cells that earlier sweeps (same experiment) finished, by trial key, instead of re-running them.
    reuse: bool = False
    # The cell each trial is compared with: these choices of dtype/quant/kernel/backend, and the
    # same model, bench, eval, seed, device and GPU type as the trial. Run first.
    baseline: dict[str, str] = field(default_factory=lambda: {"dtype": "bf16", "kernel": "torch", "backend": "hf"})
    report: bool = True  # the comparison report (table and plots) on the parent run at the sweep's end


@dataclass
class RootConfig:
    model: ModelConfig = MISSING
    dtype: DtypeConfig = MISSING
    quant: QuantConfig = MISSING
    kernel: KernelConfig = MISSING
    backend: BackendConfig = MISSING
    bench: BenchConfig = MISSING
    eval: EvalConfig = MISSING
    cluster: ClusterConfig = MISSING
    tracking: TrackingConfig = MISSING
    sweep: SweepConfig = field(default_factory=SweepConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    device: str = rule("auto", choices=("auto", "cpu", "cuda"))
    seed: int = rule(0, ge=0, le=2 ** 32 - 1)  # numpy's seeds are 32-bit


GROUP_SCHEMAS = {"model": ModelConfig, "dtype": DtypeConfig, "quant": QuantConfig, "kernel": KernelConfig,
                 "backend": BackendConfig, "bench": BenchConfig, "eval": EvalConfig,
                 "cluster": ClusterConfig, "tracking": TrackingConfig}


def register() -> None:
    """Register the root schema and one schema per group (``base_<group>``)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RootConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)


def _fmt_choices(choices: tuple) -> str:
    return ", ".join("null" if c is None else str(c) for c in choices)


def _nested_schema(tp: Any) -> Optional[type]:
    for candidate in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


@functools.cache
def _type_hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)  # evaluates the string annotations: slow, so once per schema


def validate(cfg: DictConfig | dict, schema: type = RootConfig, prefix: str = "") -> None:
    """Check every field rule; raise :class:`ConfigError` naming the first bad key."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    hints = _type_hints(schema)
    for f in dataclasses.fields(schema):
        key, value = prefix + f.name, cfg[f.name]
        nested = _nested_schema(hints[f.name])
        if nested is not None and isinstance(value, dict):
            validate(value, nested, key + ".")
            continue
        if isinstance(value, list):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, value, "allowed: a finite number")
        choices, ge, gt, le = (f.metadata.get(k) for k in ("choices", "ge", "gt", "le"))
        if choices is not None and value not in choices:
            raise ConfigError(key, value, f"allowed: {_fmt_choices(choices)}")
        if value is not None and ge is not None and value < ge:
            raise ConfigError(key, value, f"allowed: >= {ge:g}")
        if value is not None and gt is not None and value <= gt:
            raise ConfigError(key, value, f"allowed: > {gt:g}")
        if value is not None and le is not None and value > le:
            raise ConfigError(key, value, f"allowed: <= {le:g}")


def _schema_at(path: str) -> Any:
    """The dataclass (or field type) at a dotted ``path`` of the schema; None if not there."""
    node: Any = RootConfig
    for part in filter(None, path.split(".")):
        schema = _nested_schema(node)
        hints = _type_hints(schema) if schema else {}
        if part not in hints:
            return None
        node = hints[part]
    return node


def allowed_keys(path: str) -> list[str]:
    """The keys the schema allows under a dotted ``path`` ('' for the root)."""
    schema = _nested_schema(_schema_at(path))
    return [f.name for f in dataclasses.fields(schema)] if schema else []


def type_name(path: str) -> str:
    """How the schema types the key at ``path``, for error messages ("int", "Optional[str]")."""
    tp = _schema_at(path)
    return "unknown" if tp is None else getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
