"""A trial's roofline: the bytes that must move and the FLOPs at each precision, for one prefill and for
one decode step, from the model's shape and the trial's scheme, and the time a device's peaks allow.

Torch-free: the trial records its costs and how close it came to them; the driver predicts a sweep's
device time before anything runs (``hydra.launcher.plan_only=true``); the report predicts every trial on
other accelerators. The model is a Llama-style decoder (q/k/v/o, gate/up/down, lm_head), which is what
``model.source`` builds and loads here.

What is counted (the minimum a good kernel moves and computes):
- FLOPs: the matmuls, 2 x in x out per token for each linear (lm_head over every prefill position, as
  the bench's forward computes it) and attention's two (4 x heads x head_dim per query and key, over the
  whole prompt in prefill, as ``torch.utils.flop_counter`` counts SDPA, and over the context in decode).
  Norms, RoPE, softmax and activations are not counted; they are a few percent at most.
- Bytes: every weight once at its stored size (codes, scales, zero points; unquantized layers and
  embeddings at the compute dtype), each linear's input and output activations, attention's Q, K, V and
  output, and in decode the KV cache read at its format and the new token's written. The bench's
  prefill runs without a cache.

Precision: a quantized layer whose inputs are quantized too computes in its format where that format is
a compute type (fp8, int8, fp4, fp6); otherwise every matmul runs at the compute dtype (weights
dequantized in registers, or, as the torch reference does, in memory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from jobs.config import DtypeConfig, ModelConfig, TrialConfig, layer_scheme
from kernels.catalog import BlockSpec, get_format, storage_bytes

WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}
PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "int8", "fp6", "fp4")
PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# A quantized format's matmul precision where weights and inputs are both in it.
COMPUTE_TYPES = {"fp8_e4m3": "fp8", "fp8_e5m2": "fp8", "mxfp8_e4m3": "fp8", "mxfp8_e5m2": "fp8", "int8": "int8",
                 "mxint8": "int8", "fp4_e2m1": "fp4", "mxfp4": "fp4", "nvfp4": "fp4", "fp6_e2m3": "fp6",
                 "fp6_e3m2": "fp6", "mxfp6_e2m3": "fp6", "mxfp6_e3m2": "fp6"}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        """From a transformers ``config.json``."""
        heads = config["num_attention_heads"]
        return cls(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"], heads,
                   config.get("num_key_value_heads") or heads, config.get("head_dim") or config["hidden_size"] // heads,
                   config["vocab_size"])

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, out features, in features) of every linear layer, in model order."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = []
        for n in range(self.layers):
            attn, mlp = f"model.layers.{n}.self_attn", f"model.layers.{n}.mlp"
            out += [(f"{attn}.q_proj", q, h), (f"{attn}.k_proj", kv, h), (f"{attn}.v_proj", kv, h),
                    (f"{attn}.o_proj", h, q), (f"{mlp}.gate_proj", i, h), (f"{mlp}.up_proj", i, h),
                    (f"{mlp}.down_proj", h, i)]
        return out + [("lm_head", self.vocab, h)]


def model_shape(model: ModelConfig) -> Optional[ModelShape]:
    """The shape from the model's ``config.json`` (the built tiny model's, a local path's, or a hub id's
    if the hub cache holds it), or from the tiny model's build settings before it is built; None if
    no config can be read here without downloading."""
    from jobs.cache import built_model_dir

    if model.source == "build":
        path = built_model_dir(model.build) / "config.json"
        if not path.is_file():
            b = model.build
            return ModelShape(b.num_layers, b.hidden_size, b.intermediate_size, b.num_heads, b.num_heads,
                              b.hidden_size // b.num_heads, b.vocab_size)
    elif model.source == "path":
        path = Path(model.path or "").expanduser() / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(model.path or "", "config.json")
        except Exception:  # an id the hub library refuses
            return None
        path = Path(found) if isinstance(found, str) else Path("/nonexistent")
    try:
        return ModelShape.from_config(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class Cost:
    """What one phase must move and compute."""
    bytes: float = 0.0
    flops: dict[str, float] = field(default_factory=dict)  # precision -> FLOPs

    def add_flops(self, precision: str, flops: float) -> None:
        self.flops[precision] = self.flops.get(precision, 0.0) + flops

    def metrics(self, phase: str) -> dict[str, float]:
        return {f"{phase}_bytes": self.bytes, **{f"{phase}_flops_{p}": f for p, f in self.flops.items()}}

    @classmethod
    def from_metrics(cls, metrics: dict[str, float], phase: str) -> Optional["Cost"]:
        """The cost a trial logged for ``phase`` (:meth:`metrics`), or None if it logged none."""
        if f"{phase}_bytes" not in metrics:
            return None
        return cls(metrics[f"{phase}_bytes"], {p: metrics[f"{phase}_flops_{p}"] for p in PRECISIONS
                                               if f"{phase}_flops_{p}" in metrics})


@dataclass(frozen=True)
class LayerCost:
    name: str
    out_features: int
    in_features: int
    weight_bytes: int
    precision: str  # its matmul's


def compute_dtype(cfg: TrialConfig) -> str:
    return cfg.model.dtype if cfg.dtype.compute_dtype == "auto" else cfg.dtype.compute_dtype


def layer_costs(shape: ModelShape, cfg: TrialConfig) -> list[LayerCost]:
    """Each linear's stored weight bytes and matmul precision under the trial's scheme and rules."""
    width, base = WIDTH[compute_dtype(cfg)], PRECISION[compute_dtype(cfg)]
    out = []
    for name, rows, cols in shape.linears():
        scheme = layer_scheme(cfg, name)
        dtype: Optional[DtypeConfig] = None if scheme is None else scheme.dtype
        quantized = dtype is not None and dtype.format is not None and cfg.quant.weights
        weight = (storage_bytes(dtype.format, (rows, cols), _granularity(dtype), dtype.group_size, dtype.symmetric)
                  if quantized else rows * cols * width)
        native = quantized and cfg.quant.activations and dtype.format in COMPUTE_TYPES
        out.append(LayerCost(name, rows, cols, weight, COMPUTE_TYPES[dtype.format] if native else base))
    return out


def _granularity(dtype: DtypeConfig) -> str:
    return "per_block" if isinstance(get_format(dtype.format), BlockSpec) else dtype.granularity


def kv_bytes_per_token(shape: ModelShape, cfg: TrialConfig) -> float:
    """Bytes of one token's keys and values over every layer, at the cache's format."""
    dtype = cfg.dtype
    per_layer = 2 * shape.kv_heads * shape.head_dim
    if cfg.quant.kv_cache and dtype.format is not None:  # one scale per token and head (or MX/NVFP4 blocks)
        block = isinstance(get_format(dtype.format), BlockSpec)
        one = storage_bytes(dtype.format, (shape.kv_heads, shape.head_dim), "per_block" if block else "per_channel",
                            dtype.group_size, dtype.symmetric)
        return shape.layers * 2 * one
    return shape.layers * per_layer * WIDTH[compute_dtype(cfg)]


def prefill_cost(shape: ModelShape, cfg: TrialConfig, batch: int, tokens: int) -> Cost:
    """One forward over ``batch`` prompts of ``tokens`` tokens, without a cache (the bench's prefill)."""
    return _forward(shape, cfg, batch, tokens, context=tokens, cache=False)


def decode_cost(shape: ModelShape, cfg: TrialConfig, batch: int, context: int) -> Cost:
    """One decode step of ``batch`` sequences attending to ``context`` tokens (the new one included)."""
    return _forward(shape, cfg, batch, 1, context=context, cache=True)


def _forward(shape: ModelShape, cfg: TrialConfig, batch: int, queries: int, context: int, cache: bool) -> Cost:
    width, base = WIDTH[compute_dtype(cfg)], PRECISION[compute_dtype(cfg)]
    tokens = batch * queries
    cost = Cost()
    layers = layer_costs(shape, cfg)
    for layer in layers:
        cost.add_flops(layer.precision, 2.0 * tokens * layer.in_features * layer.out_features)
        cost.bytes += layer.weight_bytes + tokens * (layer.in_features + layer.out_features) * width
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # QK^T and PV: 2 FLOPs per multiply-add, two matmuls, every query against every key (as SDPA counts).
    cost.add_flops(base, shape.layers * 4.0 * batch * shape.heads * queries * context * shape.head_dim)
    cost.bytes += shape.layers * tokens * 2 * q * width  # Q read, attention output written
    if cache:
        cost.bytes += batch * context * kv_bytes_per_token(shape, cfg)  # the cache read, the new token's included
        cost.bytes += tokens * kv_bytes_per_token(shape, cfg)  # the new token's keys and values written
    else:
        cost.bytes += shape.layers * tokens * 2 * kv * width  # K and V read by attention
    cost.bytes += tokens * shape.hidden * width  # the embedding rows gathered
    return cost


@dataclass(frozen=True)
class Peaks:
    """What a device can do: memory bandwidth (bytes/s) and matmul throughput (FLOP/s) per precision."""
    bandwidth: float
    flops: dict[str, float]
    native: tuple[str, ...] = ()  # precisions it computes in hardware; others run at ``fallback``'s rate

    def rate(self, precision: str, fallback: str) -> tuple[float, bool]:
        """(FLOP/s for ``precision``, whether it is emulated: dequantized and computed at ``fallback``)."""
        if precision in self.flops and (not self.native or precision in self.native):
            return self.flops[precision], False
        return self.flops.get(fallback, max(self.flops.values())), True


@dataclass(frozen=True)
class Roofline:
    seconds: float
    memory_s: float
    compute_s: float
    emulated: bool

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"


def roofline(cost: Cost, peaks: Peaks, fallback: str) -> Roofline:
    """The time ``cost`` takes at ``peaks``: the longer of moving its bytes and computing its FLOPs."""
    compute, emulated = 0.0, False
    for precision, flops in cost.flops.items():
        rate, emulating = peaks.rate(precision, fallback)
        compute += flops / rate
        emulated |= emulating and precision != fallback
    memory = cost.bytes / peaks.bandwidth
    return Roofline(max(memory, compute), memory, compute, emulated)


def trial_costs(cfg: TrialConfig, shape: ModelShape) -> tuple[Cost, Cost]:
    """(one bench prefill, one decode step at the bench's mean context)."""
    bench = cfg.bench
    mean_context = bench.prompt_len + (bench.decode_tokens + 1) / 2
    return (prefill_cost(shape, cfg, bench.batch_size, bench.prompt_len),
            decode_cost(shape, cfg, bench.batch_size, round(mean_context)))


def device_seconds(cfg: TrialConfig, shape: ModelShape, peaks: Peaks) -> float:
    """The device time a trial's bench and eval need at ``peaks`` (its compute only: not loading,
    quantizing or the host's overheads): warm-up and timed prefills and decodes, and the eval windows."""
    prefill, decode = trial_costs(cfg, shape)
    fallback = PRECISION[compute_dtype(cfg)]
    bench = cfg.bench
    runs = bench.warmup + bench.repeats
    bench_s = runs * (2 * roofline(prefill, peaks, fallback).seconds
                      + bench.decode_tokens * roofline(decode, peaks, fallback).seconds)
    windows = max(1, cfg.eval.max_tokens // cfg.eval.seq_len)
    eval_s = windows * roofline(prefill_cost(shape, cfg, 1, cfg.eval.seq_len), peaks, fallback).seconds
    return bench_s + eval_s
