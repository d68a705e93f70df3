"""Apply a dtype (a number format and its knobs) to a model under a quant scheme.

The scheme says what is quantized: linear weights (stored packed; their matmul is the
chosen kernel), linear inputs (dynamic, one scale per token), and the KV cache (keys and
values fake-quantized per token and head, after RoPE, as a cache stored in the format
would hold them). Layers named in ``quant.skip_layers`` (``lm_head`` by default; the
embeddings are not linear layers) stay in the compute dtype.
"""

from __future__ import annotations

import fnmatch
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from jobs.config import DtypeConfig, QuantConfig
from kernels import formats, metrics
from kernels.catalog import BlockSpec, get_format
from kernels.registry import Kernel, get_kernel

KV_ATTENTION = "quantsweep_kv_sdpa"
KNOBS = ("rounding", "scale_rule", "overflow", "symmetric")


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_q is not None:
            return self.kernel(x, self.weight_q, self.bias, self.input_knobs)
        if self.input_knobs is not None:
            x = formats.fake_quant(x, **self.input_knobs)
        return F.linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        # Packed codes and scales follow the module's device but keep their own dtypes.
        super()._apply(fn, recurse)
        if self.weight_q is not None:
            self.weight_q = self.weight_q.to(fn(torch.empty(0, device=self.weight_q.codes.device)).device)
        return self

    def extra_repr(self) -> str:
        fmt = self.weight_q.spec.name if self.weight_q is not None else None
        act = self.input_knobs["fmt"] if self.input_knobs else None
        return f"in={self.in_features}, out={self.out_features}, weight={fmt}, input={act}"


def _skipped(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) or name.split(".")[-1] == p for p in patterns)


def quantize_kv_cache(model: nn.Module, knobs: dict) -> None:
    """Route attention through SDPA on fake-quantized keys and values."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, formats.fake_quant(key, **knobs),
                                      formats.fake_quant(value, **knobs), attention_mask, **kwargs)

    AttentionInterface.register(KV_ATTENTION, attention)
    model.set_attn_implementation(KV_ATTENTION)


def apply_dtype(model: nn.Module, dtype_cfg: DtypeConfig, quant_cfg: QuantConfig, kernel_name: str,
                compute_dtype: torch.dtype, seed: int = 0) -> list[dict]:
    """Cast ``model`` to ``compute_dtype`` and quantize what the scheme says.

    Returns one row per linear layer with a quantized weight: its shape, storage bytes,
    bits per element and error against the unquantized weight (SQNR dB, relative, max abs).
    """
    model.to(compute_dtype)
    if dtype_cfg.format is None:
        return []
    if quant_cfg.kv_cache:
        quantize_kv_cache(model, token_knobs(dtype_cfg, seed))
    if not (quant_cfg.weights or quant_cfg.activations):
        return []
    kernel = get_kernel(kernel_name)
    input_knobs = token_knobs(dtype_cfg, seed) if quant_cfg.activations else None
    rows = []
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not _skipped(n, quant_cfg.skip_layers)]
    for name, linear in targets:
        q = None
        if quant_cfg.weights:
            try:
                q = formats.quantize(linear.weight, **weight_knobs(dtype_cfg, seed))
            except formats.FormatError as e:
                raise formats.FormatError(f"layer {name}: {e}") from None
            w, deq = linear.weight, q.dequantize()
            rows.append({"layer": name, "shape": "x".join(map(str, q.shape)), "format": q.spec.name,
                         "bytes": q.nbytes, "bits_per_element": q.bits_per_element,
                         "sqnr_db": metrics.sqnr_db(w, deq), "relative_error": metrics.relative_error(w, deq),
                         "max_abs_error": metrics.max_abs_error(w, deq)})
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, QuantizedLinear(linear, q, kernel, input_knobs))
    return rows


def check_kernel(model: nn.Module, kernel_name: str, dtype: torch.dtype, seed: int = 0) -> list[dict]:
    """Run the chosen kernel on every distinct quantized layer shape against the torch
    reference; one row per shape with its relative error and the tolerance for ``dtype``.

    Raises :class:`~kernels.catalog.Unsupported` if the kernel cannot run a layer here.
    """
    from kernels.registry import TOLERANCE, kernel_relative_error

    rows, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear) or module.weight_q is None:
            continue
        shape = tuple(module.weight_q.shape)
        if shape in seen:
            continue
        seen.add(shape)
        err = kernel_relative_error(kernel_name, module.weight_q, dtype, module.input_knobs, seed=seed)
        rows.append({"layer": name, "shape": "x".join(map(str, shape)), "relative_error": err,
                     "tolerance": TOLERANCE[dtype]})
    return rows


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the model holds: parameters plus packed quantized weights."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(m.weight_q.nbytes for m in model.modules()
                       if isinstance(m, QuantizedLinear) and m.weight_q is not None)
