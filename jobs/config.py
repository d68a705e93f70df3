"""A trial's config, typed: one dataclass per config group.

The orchestrator's schema (``orchestrator/schema.py``) registers these with Hydra, which
type-checks every group against them while composing; value rules that types cannot express
(ranges, choices) sit in each field's metadata. A trial reads its settings through
:class:`TrialConfig` (``TrialSpec.settings``), made from the plain dict that travels in its
spec and makes up its key.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from kernels.catalog import FORMATS, GRANULARITIES, KERNELS, OVERFLOWS, ROUNDINGS, SCALE_RULES

# omegaconf.MISSING, which Hydra reads as "required"; spelled out so that a trial (a noop one in a
# fresh Ray worker, say) need not import omegaconf to read its config.
MISSING: Any = "???"
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
class OutlierPlant:
    """Outlier input channels planted in a loaded model by function-preserving rescales, as real LLMs have
    them and a briefly trained small one does not: in ``channels`` residual channels the norm gains before
    the attention and MLP times ``scale`` (the next layers' input columns divided by it), and in as many
    MLP channels the up_proj rows times ``scale`` (down_proj's input columns divided by it)."""
    channels: int = rule(4, ge=1)
    scale: float = rule(32.0, gt=1)
    seed: int = rule(0, ge=0, le=2 ** 32 - 1)


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = rule("hub", choices=("hub", "path", "build"))
    path: Optional[str] = None  # HF hub id (source=hub) or a local directory (source=path)
    dtype: str = rule("bfloat16", choices=TORCH_DTYPE_NAMES)  # the unquantized reference's dtype
    trust_remote_code: bool = False
    build: Optional[TinyModelBuild] = None
    outliers: Optional[OutlierPlant] = None  # planted at load (jobs/scaling.py), before the reference


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
class LayerRule:
    """Linear layers whose full name matches ``match`` (fnmatch, where ``*`` spans dots:
    ``*.mlp.down_proj``, ``model.layers.0.*``) take this rule's dtype and method instead of the
    trial's. Rules are tried in order and the first that matches wins; ``quant.skip_layers`` are never
    quantized. A rule's dtype sets the layer's format and knobs, its weights' and (with
    ``quant.activations``) its inputs'; the compute dtype and the KV cache stay the trial's."""
    match: str = MISSING
    # A conf/dtype name (int8, nvfp4; bf16 keeps the layer unquantized) or a dtype's settings, as in a
    # conf/dtype file. The plan resolves a name to its settings: what the trial's config (and key) holds.
    dtype: Any = None
    method: Optional[str] = rule(None, choices=(None, "rtn", "gptq"))  # None: the trial's method.name

    def __post_init__(self) -> None:
        if isinstance(self.dtype, dict):  # the typed view of a resolved rule
            self.dtype = build(DtypeConfig, self.dtype, "dtype.")


@dataclass
class QuantConfig:
    """The scheme: what the dtype's format is applied to."""
    name: str = MISSING
    weights: bool = True
    activations: bool = False  # dynamic, one scale per token
    kv_cache: bool = False     # keys and values, per token and head
    skip_layers: list[str] = rule(["lm_head"])  # names or fnmatch patterns kept unquantized
    rules: list[LayerRule] = rule([])  # per-layer dtype and method, first match wins (mixed precision)
    # Activation scales: dynamic (per token, from each input) or static (one per layer, chosen on
    # the calibration data by the observer and stored with the layer; element formats only).
    activation_scales: str = rule("dynamic", choices=("dynamic", "static"))
    # static: absmax (the largest |x| seen), percentile (that percentile of |x|), or mse (the
    # clipping of absmax with the least squared error on the calibration inputs).
    activation_observer: str = rule("absmax", choices=("absmax", "percentile", "mse"))
    activation_percentile: float = rule(99.99, gt=0, le=100)

    @property
    def static_activations(self) -> bool:
        return self.activations and self.activation_scales == "static"


@dataclass
class GptqOptions:
    """method=gptq (Frantar et al., ICLR 2023; the IST-DASLab/gptq reference): each linear's
    columns rounded in turn, the error of each spread over the columns not yet rounded by the
    inverse Hessian of the layer's calibration inputs."""
    damp: float = rule(0.01, gt=0, le=1)  # added to the Hessian's diagonal, as a fraction of its mean
    block_size: int = rule(128, ge=1)     # columns rounded before the rest are updated (lazy batch updates)
    # Columns in order of descending Hessian diagonal ("act-order"); the group scales are then
    # fixed from the unrounded weight first (static groups), so the layout stays the format's.
    act_order: bool = False
    static_groups: bool = False  # group scales from the unrounded weight, also without act_order


@dataclass
class SmoothQuantOptions:
    """method.scaling=smoothquant (Xiao et al., ICML 2023): each input channel j of the layers after a norm
    divided by ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` and their weight columns multiplied by it,
    the division folded into the norm's gain."""
    alpha: float = rule(0.5, ge=0, le=1)  # migration strength: 0 leaves activations as they are


@dataclass
class AwqOptions:
    """method.scaling=awq (Lin et al., MLSys 2024; llm-awq's auto_scale): per input channel scales
    ``s = mean|X|^a`` for ``a`` on a grid from 0 (the identity) up, the one with the least output error of
    the quantized layers on the calibration inputs kept, and folded into the op before them."""
    grid: int = rule(20, ge=1)  # a in {0, 1/grid, ..., (grid-1)/grid}


@dataclass
class MethodConfig:
    """How the codes and scales of the dtype's format are chosen: never its layout.

    ``name`` rounds: rtn to the nearest code under the format's own scale rule; gptq minimises each
    layer's output error on calibration inputs (``calib``). Before it, function-preserving transforms:
    ``rotation`` (QuaRot: orthogonal matrices folded into the weights, online where they cannot be),
    ``scaling`` (SmoothQuant or AWQ scales folded into the op before each layer), and ``clip`` (each
    block's scale shrunk where that lowers the layer's output error on calibration inputs). Each
    option's settings sit under its name (``method.gptq.damp``, ``method.awq.grid``), so one override
    serves a sweep over them.
    """
    name: str = rule("rtn", choices=("rtn", "gptq"))
    gptq: GptqOptions = field(default_factory=GptqOptions)
    # Residual stream (norm gains folded first), down_proj inputs (online), and each head's values
    # (folded) and keys (online, when the KV cache is quantized): jobs/rotation.py.
    rotation: str = rule("none", choices=("none", "hadamard", "random"))
    rotation_size: int = rule(0, choices=(0, 8, 16, 32, 64, 128, 256, 512))  # 0: full; else block-diagonal
    scaling: str = rule("none", choices=("none", "smoothquant", "awq"))
    smoothquant: SmoothQuantOptions = field(default_factory=SmoothQuantOptions)
    awq: AwqOptions = field(default_factory=AwqOptions)
    clip: bool = False  # activation-aware clipping (AWQ's auto_clip), searched per block of each layer
    clip_grid: int = rule(20, ge=1)           # ratios 1, 1 - (1 - clip_min)/grid, ..., down to clip_min
    clip_min: float = rule(0.5, gt=0, le=1)

    @property
    def transforms(self) -> bool:
        return self.rotation != "none" or self.scaling != "none" or self.clip


@dataclass
class CalibConfig:
    """The calibration data of methods and static scales: random windows of a text, never the eval text.

    ``text``: a shipped text (its train split: eval uses the held-out documents), or a path to a
    UTF-8 file. ``dataset``: an HF dataset id, used instead of ``text`` where a hub is reachable.
    """
    text: str = "stdlib-docs"
    dataset: Optional[str] = None           # e.g. allenai/c4, or wikitext with dataset_config
    dataset_config: Optional[str] = None    # e.g. wikitext-2-raw-v1
    dataset_split: str = "train"
    dataset_field: str = "text"
    num_sequences: int = rule(128, ge=1)
    seq_len: int = rule(512, ge=2)
    batch_size: int = rule(8, ge=1)         # sequences per calibration forward pass
    seed: int = rule(0, ge=0, le=2 ** 32 - 1)


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
    # A synthetic objective with a known optimum, for adaptive sweeps (orchestrator/study.py): the trial logs
    # synthetic_loss = (x - 0.3)^2 + (y + 0.2)^2, least (0) at (0.3, -0.2), and synthetic_cost = x^2 + y^2,
    # least at the origin. The two conflict; their Pareto set is the segment between those two points.
    x: float = 0.0
    y: float = 0.0


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
    batch_size: int = rule(8, ge=1)  # windows at a time: evaluation holds this many rows of vocab-wide log-probs
    # lm-evaluation-harness tasks run on the quantized model (backend=hf): shipped ones
    # (jobs/tasks.py: stdlib_next_word, stdlib_rolling) or any lm-eval task name where a hub is reachable.
    tasks: list[str] = rule([])
    task_limit: Optional[int] = rule(None, ge=1)   # examples per task (lm-eval's limit); None: all
    num_fewshot: Optional[int] = rule(None, ge=0)  # None: each task's own default


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
class TrialConfig:
    """The config a trial computes from (``jobs.spec.TRIAL_SECTIONS``) and the resources it asks for."""
    model: ModelConfig = MISSING
    dtype: DtypeConfig = MISSING
    quant: QuantConfig = MISSING
    kernel: KernelConfig = MISSING
    backend: BackendConfig = MISSING
    bench: BenchConfig = MISSING
    eval: EvalConfig = MISSING
    # Defaults, not MISSING: configs stored before methods existed have neither section.
    method: MethodConfig = field(default_factory=MethodConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    device: str = rule("auto", choices=("auto", "cpu", "cuda"))
    seed: int = rule(0, ge=0, le=2 ** 32 - 1)  # numpy's seeds are 32-bit

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "TrialConfig":
        return build(cls, config)


@dataclass(frozen=True)
class LayerScheme:
    """What one linear layer is quantized to, and by which rounding; ``rule``: the index of the
    ``quant.rules`` entry it took, None for the trial's own dtype and method."""
    dtype: DtypeConfig
    method: str
    rule: Optional[int] = None
    match: Optional[str] = None  # the rule's glob

    @property
    def label(self) -> str:
        """What the layer record says of it: ``trial``, or the rule's index and glob."""
        return "trial" if self.rule is None else f"{self.rule}: {self.match}"


def layer_scheme(cfg: TrialConfig, name: str) -> Optional[LayerScheme]:
    """The layer's dtype and method under ``quant.rules`` (first match wins), or None for a layer in
    ``quant.skip_layers``. A rule's dtype must be resolved (the plan does it)."""
    quant = cfg.quant
    if is_skipped(name, quant.skip_layers):
        return None
    for index, layer_rule in enumerate(quant.rules):
        if fnmatch.fnmatchcase(name, layer_rule.match):
            dtype = layer_rule.dtype if layer_rule.dtype is not None else cfg.dtype
            return LayerScheme(dtype, layer_rule.method or cfg.method.name, index, layer_rule.match)
    return LayerScheme(cfg.dtype, cfg.method.name)


def is_skipped(name: str, patterns: list[str]) -> bool:
    """Whether ``quant.skip_layers`` names the layer: a pattern matching its full name, or its last part."""
    return any(fnmatch.fnmatch(name, p) or name.split(".")[-1] == p for p in patterns)


def layer_dtypes(cfg: TrialConfig) -> list[DtypeConfig]:
    """Every dtype the trial's linear layers may take: its own and its rules'."""
    return [cfg.dtype, *(r.dtype for r in cfg.quant.rules if r.dtype is not None)]


def uses_calibration(cfg: TrialConfig) -> bool:
    """Whether the trial computes anything from calibration data (and ``calib`` is part of its key)."""
    method, quant = cfg.method, cfg.quant
    if all(d.format is None for d in layer_dtypes(cfg)):
        return False
    if cfg.dtype.format is not None and method.name != "rtn":
        return True
    return (quant.static_activations or method.scaling != "none" or method.clip
            or any(r.method == "gptq" and (r.dtype is None or r.dtype.format is not None) for r in quant.rules))


def nested_schema(tp: Any) -> Optional[type]:
    """The dataclass a field's type names (``X``, ``Optional[X]`` or ``list[X]``), or None."""
    for candidate in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


@functools.cache
def type_hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)  # evaluates the string annotations: slow, so once per schema


def build(schema: type, data: dict[str, Any], prefix: str = "") -> Any:
    """``schema`` filled from plain ``data``: nested dicts become their dataclasses, absent keys take
    their defaults; an unknown key or a required one left missing raises ValueError."""
    hints, names = type_hints(schema), {f.name for f in dataclasses.fields(schema)}
    for key in data:
        if key not in names:
            raise ValueError(f"{prefix}{key}: not a key of {schema.__name__}; allowed: {', '.join(sorted(names))}")
    values = {}
    for f in dataclasses.fields(schema):
        if f.name not in data:
            if f.default == MISSING:
                raise ValueError(f"{prefix}{f.name}: missing")
            continue
        value, nested = data[f.name], nested_schema(hints[f.name])
        if nested and isinstance(value, dict):
            value = build(nested, value, f"{prefix}{f.name}.")
        elif nested and isinstance(value, list):  # list[X] of a dataclass X: each item built
            value = [build(nested, v, f"{prefix}{f.name}[{i}].") if isinstance(v, dict) else v
                     for i, v in enumerate(value)]
        values[f.name] = value
    return schema(**values)
