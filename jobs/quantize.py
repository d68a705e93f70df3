"""Apply a dtype (a number format and its knobs) to a model under a quant scheme, by a method.

The scheme says what is quantized: linear weights (stored packed; their matmul is the
chosen kernel), linear inputs (one scale per token, or one static scale per layer chosen on
calibration data), and the KV cache (keys and values fake-quantized per token and head, after
RoPE, as a cache stored in the format would hold them). Layers named in ``quant.skip_layers``
(``lm_head`` by default; the embeddings are not linear layers) stay in the compute dtype.

The method chooses the weights' codes and scales: ``rtn`` rounds to nearest; ``gptq``
(jobs/gptq.py) works layer by layer on calibration inputs (jobs/sequential.py). While layers
are calibrated, the quantized ones compute through the torch reference; the chosen kernel takes
over when all are done. Before that, the method's function-preserving transforms rewrite the
unquantized model: a rotation (jobs/rotation.py), then SmoothQuant or AWQ scales (jobs/scaling.py);
a searched clipping (jobs/clipping.py) chooses each layer's scales as it is quantized.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from jobs.clipping import clip_scales
from jobs.config import DtypeConfig, LayerScheme, QuantConfig, TrialConfig, layer_dtypes, layer_scheme, uses_calibration
from jobs.gptq import gptq_quantize, output_error
from jobs.rotation import rotate
from jobs.scaling import scale_model
from jobs.sequential import LayerInputs, calibrate
from kernels import formats, metrics
from kernels.catalog import BlockSpec, get_format
from kernels.registry import Kernel, get_kernel, torch_reference
from kernels.rotations import Rotation

log = logging.getLogger(__name__)

KV_ATTENTION = "quantsweep_kv_sdpa"
KNOBS = ("rounding", "scale_rule", "overflow", "symmetric")
OBSERVER_STEPS = 57  # clippings the mse observer tries: absmax * 2**(-k/8), down to absmax / 128


def weight_knobs(dtype_cfg: DtypeConfig, seed: int) -> dict:
    """``formats.quantize``'s keyword arguments for the dtype's weights."""
    return {"fmt": dtype_cfg.format, "granularity": dtype_cfg.granularity, "group_size": dtype_cfg.group_size,
            "seed": seed, **{k: getattr(dtype_cfg, k) for k in KNOBS}}


def token_knobs(dtype_cfg: DtypeConfig, seed: int) -> dict:
    """Knobs for activations and the KV cache: one scale per token (row), or MX/NVFP4 blocks along it."""
    block = isinstance(get_format(dtype_cfg.format), BlockSpec)
    return {**weight_knobs(dtype_cfg, seed), "granularity": "per_block" if block else "per_channel"}


class QuantizedLinear(nn.Module):
    """A linear layer with a packed quantized weight and/or dynamically quantized inputs."""

    def __init__(self, linear: nn.Linear, weight: Optional[formats.QuantizedTensor], kernel: Kernel,
                 input_knobs: Optional[dict]):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_q = weight
        self.weight = None if weight is not None else nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.kernel, self.input_knobs = kernel, input_knobs
        self.input_rotation: Optional[Rotation] = getattr(linear, "input_rotation", None)  # online, before all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation.apply(x)
        if self.weight_q is not None:
            return self.kernel(x, self.weight_q, self.bias, self.input_knobs)
        if self.input_knobs is not None:
            x = formats.fake_quant(x, **self.input_knobs)
        return F.linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        # Packed codes and a static input scale follow the module's device but keep their own dtypes.
        super()._apply(fn, recurse)
        if self.weight_q is not None:
            self.weight_q = self.weight_q.to(fn(torch.empty(0, device=self.weight_q.codes.device)).device)
        static = self.input_knobs["scales"] if self.input_knobs and "scales" in self.input_knobs else None
        if static is not None:
            device = fn(torch.empty(0, device=static.scales.device)).device
            self.input_knobs = {**self.input_knobs, "scales": static.to(device)}
        return self

    def extra_repr(self) -> str:
        fmt = self.weight_q.spec.name if self.weight_q is not None else None
        act = self.input_knobs["fmt"] if self.input_knobs else None
        return f"in={self.in_features}, out={self.out_features}, weight={fmt}, input={act}"


def quantize_kv_cache(model: nn.Module, knobs: dict, head_rotation: Optional[Rotation] = None) -> None:
    """Route attention through SDPA on fake-quantized keys and values, queries and keys first rotated
    online per head where the model is rotated (its values are, in v_proj)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        if head_rotation is not None:
            query, key = head_rotation.apply(query), head_rotation.apply(key)
        return sdpa_attention_forward(module, query, formats.fake_quant(key, **knobs),
                                      formats.fake_quant(value, **knobs), attention_mask, **kwargs)

    AttentionInterface.register(KV_ATTENTION, attention)
    model.set_attn_implementation(KV_ATTENTION)


def apply_dtype(model: nn.Module, cfg: TrialConfig, compute_dtype: torch.dtype,
                calibration: Optional[torch.Tensor] = None,
                stored: Optional[QuantizedLayers] = None) -> list[dict]:
    """Cast ``model`` to ``compute_dtype`` and quantize what the scheme says, by the trial's method.

    ``calibration`` (token windows) is for methods and static scales that need data; ``stored``
    is a cached quantized model's layers, put in place as they are.
    Returns one row per linear layer with a quantized weight: its shape, storage bytes, bits per
    element and error against the unquantized weight (SQNR dB, relative, max abs) and, when
    calibrated, the output error on the calibration inputs, by this method and by RTN, with what
    the scaling and the clipping chose for it.
    """
    dtype_cfg, quant_cfg, method = cfg.dtype, cfg.quant, cfg.method
    model.to(compute_dtype)
    if all(d.format is None for d in layer_dtypes(cfg)):
        return []
    head_rotation = rotate(model, method, cfg.seed) if method.rotation != "none" else None
    targets = _targets(model, cfg)
    quantized = [(n, m) for n, m, scheme in targets if scheme.dtype.format is not None]
    notes: dict[str, dict] = {}
    if stored is not None:
        with torch.no_grad():
            for name, value in stored.params.items():  # what the transforms changed outside the quantized layers
                model.get_parameter(name).copy_(value)
    elif method.scaling != "none":
        dequantizers = {n: _dequantizer(scheme.dtype, cfg.seed) for n, _, scheme in targets
                        if scheme.dtype.format is not None} if quant_cfg.weights else {}
        notes = scale_model(model, calibration, method, cfg.calib.batch_size, cfg.calib.seed, dequantizers)
    if quant_cfg.kv_cache and dtype_cfg.format is not None:
        quantize_kv_cache(model, token_knobs(dtype_cfg, cfg.seed), head_rotation)
    if not (quant_cfg.weights or quant_cfg.activations):
        return []
    schemes = {n: scheme for n, _, scheme in targets}
    rows: list[dict] = []
    if stored is not None:
        rows = stored.rows
        for name, linear in quantized:
            knobs = input_knobs(schemes[name].dtype, cfg, stored.input_scales[name], linear.weight.device)
            _replace(model, name, QuantizedLinear(linear, stored.weights[name], torch_reference, knobs))
    elif calibration is not None:
        def finish(group, inputs: Optional[LayerInputs]) -> None:
            for name, linear in group:
                _quantize_layer(model, name, linear, schemes[name], cfg, inputs, rows)
        calibrate(model, calibration, cfg.calib.batch_size, quantized, finish,
                  keep_sample=quant_cfg.static_activations and quant_cfg.activation_observer != "absmax",
                  seed=cfg.calib.seed)
    else:
        for name, linear in quantized:
            _quantize_layer(model, name, linear, schemes[name], cfg, None, rows)
    kernel = get_kernel(cfg.kernel.name)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.kernel = kernel
    for row in rows:
        row.update(notes.get(row["layer"], {}))
    if quant_cfg.rules and stored is None:  # every layer's record names the rule it took, kept ones too
        rows += [_kept_row(n, m, schemes[n]) for n, m, scheme in targets if scheme.dtype.format is None]
        order = {n: i for i, (n, _, _) in enumerate(targets)}
        rows.sort(key=lambda row: order[row["layer"]])
        for row in rows:
            row["rule"] = schemes[row["layer"]].label
    return rows


def _dequantizer(dtype_cfg: DtypeConfig, seed: int):
    knobs = weight_knobs(dtype_cfg, seed)
    return lambda w: formats.quantize(w, **knobs).dequantize()


def _kept_row(name: str, linear: nn.Linear, scheme: LayerScheme) -> dict:
    """The record of a layer a rule keeps unquantized: its weight at the compute dtype."""
    w = linear.weight
    return {"layer": name, "shape": "x".join(map(str, w.shape)), "format": str(w.dtype).removeprefix("torch."),
            "method": "-", "bytes": w.numel() * w.element_size(), "bits_per_element": 8.0 * w.element_size()}


def _targets(model: nn.Module, cfg: TrialConfig) -> list[tuple[str, nn.Linear, LayerScheme]]:
    """The linear layers the scheme covers (not skipped), each with its dtype and method."""
    found = [(n, m, layer_scheme(cfg, n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [(n, m, scheme) for n, m, scheme in found if scheme is not None]


@dataclass
class QuantizedLayers:
    """Every quantized linear layer's weight and static input scale, by name, the layer rows, and the
    model's other parameters where a transform changed them: what a cached quantized model holds
    (jobs/quantized_cache.py). A rotation is made again on load; it needs no data."""
    weights: dict[str, Optional[formats.QuantizedTensor]]
    input_scales: dict[str, Optional[float]]
    rows: list[dict]
    params: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module, rows: list[dict], cfg: TrialConfig) -> "QuantizedLayers":
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
        scales = {n: float(m.input_knobs["scales"].scales[0]) if m.input_knobs and "scales" in m.input_knobs else None
                  for n, m in layers.items()}
        changed = cfg.method.rotation != "none" or cfg.method.scaling != "none"
        params = {n: p.detach() for n, p in model.named_parameters()} if changed else {}
        return cls({n: m.weight_q for n, m in layers.items()}, scales, rows, params)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def _quantize_layer(model: nn.Module, name: str, linear: nn.Linear, scheme: LayerScheme, cfg: TrialConfig,
                    inputs: Optional[LayerInputs], rows: list[dict]) -> None:
    """Quantize one layer to its dtype by its method (RTN where it saw no calibration input) and put it
    in place, computing through the torch reference until every layer is done."""
    dtype_cfg, quant_cfg = scheme.dtype, cfg.quant
    input_scale = None
    if quant_cfg.static_activations:
        if inputs is None:
            raise ValueError(f"layer {name}: no calibration input reached it, so it has no static activation scale")
        input_scale = activation_scale(inputs, dtype_cfg, quant_cfg)
    q, method = None, cfg.method
    rounding = scheme.method
    if quant_cfg.weights:
        knobs, scales, ratios = weight_knobs(dtype_cfg, cfg.seed), None, None
        try:
            rtn = formats.quantize(linear.weight, **knobs)
            if inputs is None and (rounding != "rtn" or method.clip):
                log.warning("layer %s: no calibration input reached it; rounded to nearest", name)
            if method.clip and inputs is not None:
                scales, ratios = clip_scales(linear.weight, inputs.hessian, dtype_cfg, method)
            if rounding == "gptq" and inputs is not None:
                q = gptq_quantize(linear.weight, inputs.hessian, dtype_cfg, method.gptq, scales)
            else:
                q = rtn if scales is None else formats.quantize(linear.weight, **knobs, scales=scales)
        except formats.FormatError as e:
            raise formats.FormatError(f"layer {name}: {e}") from None
        w, deq = linear.weight, q.dequantize()
        row = {"layer": name, "shape": "x".join(map(str, q.shape)), "format": q.spec.name, "method": rounding,
               "bytes": q.nbytes, "bits_per_element": q.bits_per_element, "sqnr_db": metrics.sqnr_db(w, deq),
               "relative_error": metrics.relative_error(w, deq), "max_abs_error": metrics.max_abs_error(w, deq)}
        if ratios is not None:
            row["clip_ratio_mean"] = float(ratios.mean())
        if uses_calibration(cfg):
            hessian = inputs.hessian if inputs is not None else None
            row["output_error"] = math.nan if hessian is None else output_error(w, deq, hessian)
            rtn_deq = deq if q is rtn else rtn.dequantize()
            row["output_error_rtn"] = math.nan if hessian is None else output_error(w, rtn_deq, hessian)
            row["input_scale"] = math.nan if input_scale is None else input_scale
        rows.append(row)
    knobs = input_knobs(dtype_cfg, cfg, input_scale, linear.weight.device)
    _replace(model, name, QuantizedLinear(linear, q, torch_reference, knobs))


def input_knobs(dtype_cfg: DtypeConfig, cfg: TrialConfig, static_scale: Optional[float],
                device: torch.device) -> Optional[dict]:
    """``fake_quant`` knobs of a layer's inputs in its dtype: per token, or one static fp32 scale for all."""
    if not cfg.quant.activations:
        return None
    knobs = token_knobs(dtype_cfg, cfg.seed)
    if cfg.quant.static_activations:
        knobs.update(granularity="per_tensor", scales=formats.Scales(torch.tensor([static_scale], device=device)))
    return knobs


def activation_scale(inputs: LayerInputs, dtype_cfg: DtypeConfig, quant_cfg: QuantConfig) -> float:
    """A layer's static input scale from its calibration inputs, by ``quant.activation_observer``."""
    spec = get_format(dtype_cfg.format)
    if quant_cfg.activation_observer == "absmax":
        clip = inputs.amax
    else:
        values = inputs.absolute_values()
        if quant_cfg.activation_observer == "percentile":
            k = max(1, math.ceil(quant_cfg.activation_percentile / 100 * values.numel()))
            clip = float(values.kthvalue(k).values)
        else:  # mse: the clipping of absmax whose rounding error over the inputs is least
            def error(clip: float) -> float:
                scales = formats.Scales(torch.tensor([clip / spec.max]))
                q = formats.quantize(values, dtype_cfg.format, granularity="per_tensor", scales=scales,
                                     overflow="saturate")
                return float((q.dequantize() - values).pow(2).sum())
            clip = min((inputs.amax * 2.0 ** (-k / 8) for k in range(OBSERVER_STEPS)), key=error)
    return float(torch.tensor(clip / spec.max if clip > 0 else 1.0, dtype=torch.float32))  # the fp32 scale in use


def check_kernel(model: nn.Module, kernel_name: str, dtype: torch.dtype, seed: int = 0) -> list[dict]:
    """Run the chosen kernel on every distinct (layer shape, format, input format) against the torch
    reference (a mixed-precision model dispatches per layer); one row each with its relative error and
    the tolerance for ``dtype``.

    Raises :class:`~kernels.catalog.Unsupported` if the kernel cannot run a layer here.
    """
    from kernels.registry import TOLERANCE, kernel_relative_error

    rows, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear) or module.weight_q is None:
            continue
        weight, knobs = module.weight_q, module.input_knobs
        shape = tuple(weight.shape)
        case = (shape, weight.spec.name, weight.block, weight.zero_points is not None,
                None if knobs is None else knobs["fmt"])
        if case in seen:
            continue
        seen.add(case)
        err = kernel_relative_error(kernel_name, weight, dtype, knobs, seed=seed)
        rows.append({"layer": name, "shape": "x".join(map(str, shape)), "format": weight.spec.name,
                     "relative_error": err, "tolerance": TOLERANCE[dtype]})
    return rows


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the model holds: parameters plus packed quantized weights."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(m.weight_q.nbytes for m in model.modules()
                       if isinstance(m, QuantizedLinear) and m.weight_q is not None)
