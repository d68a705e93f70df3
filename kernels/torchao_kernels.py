"""torchao's kernels on our quantized weights (``kernel=torchao``).

The weight's own codes and scales are wrapped in torchao's tensor subclasses, not
requantized by torchao, so the comparison with the other kernels is kernel against kernel
on identical numbers (torchao's own quantizers pick scales differently, e.g. int8 absmax/127.5).
``F.linear`` on such a tensor dispatches to torchao's implementation for it:

- int8 (symmetric, per channel or group): ``Int8Tensor``, torchao's weight-only int8 mm;
- int4 (symmetric, per group): ``IntxUnpackedToInt8Tensor`` (torchao's portable path;
  its tinygemm layout is asymmetric, a different scheme);
- fp8_e4m3 per channel: ``Float8Tensor``, weight-only, or W8A8 with per-token activations
  (``quant=w_a_dynamic``; torchao's ``_scaled_mm`` path, CUDA compute capability >= 8.9);
- nvfp4: ``NVFP4Tensor``, weight-only.

Anything else raises :class:`~kernels.catalog.Unsupported` naming what torchao has.
torchao is imported lazily, with an install hint if it is missing.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kernels.catalog import Unsupported, is_plain_fp8_per_token
from kernels.formats import QuantizedTensor, value_table

SUPPORTED = "int8/int4 (symmetric, per channel or group), fp8_e4m3 (per channel; W8A8 per token), nvfp4"


def _require_torchao() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise Unsupported("kernel=torchao needs torchao: pip install 'torchao>=0.18'") from None


def _int_codes(weight: QuantizedTensor) -> torch.Tensor:
    """Signed integer codes as int8, shape [N, K]."""
    values = value_table(weight.element).to(weight.codes.device)
    return values[weight.element_codes().long()].to(torch.int8)


def _block_scales(weight: QuantizedTensor) -> tuple[torch.Tensor, list[int]]:
    """Scales as an [N, K // block] tensor and torchao's ``block_size`` for them."""
    n, k = weight.shape
    if weight.block % k == 0:  # per channel, or per tensor (one scale repeated per row)
        return weight.scale_values().repeat_interleave(weight.block // k).view(n, 1), [1, k]
    return weight.scale_values().view(n, k // weight.block), [1, weight.block]


def _wrap(weight: QuantizedTensor, dtype: torch.dtype, input_knobs: Optional[dict]) -> torch.Tensor:
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor
    from torchao.quantization import Float8Tensor, Int8Tensor, IntxUnpackedToInt8Tensor

    name = weight.spec.name
    if len(weight.shape) != 2:
        raise Unsupported(f"kernel=torchao takes 2-D weights, got shape {tuple(weight.shape)}")
    if input_knobs is not None and name != "fp8_e4m3":
        raise Unsupported(f"kernel=torchao quantizes activations only for fp8_e4m3 W8A8; got {name}")
    if name in ("int8", "int4") and weight.zero_points is None:
        scales, block = _block_scales(weight)
        codes = _int_codes(weight)
        if name == "int8":
            return Int8Tensor(codes, scales, block, dtype)
        return IntxUnpackedToInt8Tensor(codes, scales.to(dtype), torch.zeros_like(scales, dtype=torch.int8),
                                        torch.int4, tuple(block), dtype, None)
    if name == "fp8_e4m3" and weight.block == weight.shape[1]:
        scales, block = _block_scales(weight)
        codes = weight.element_codes().view(torch.float8_e4m3fn)
        if input_knobs is None:
            return Float8Tensor(codes, scales, block, dtype=dtype)
        return _fp8_w8a8(codes, scales, block, dtype, input_knobs)
    if name == "nvfp4":
        n, k = weight.shape
        return NVFP4Tensor(weight.codes.view(n, k // 2), weight.scales.view(torch.float8_e4m3fn).view(n, -1),
                           weight.block, dtype, per_tensor_scale=weight.tensor_scale.float().reshape(()))
    raise Unsupported(f"no torchao kernel for {name} weights (granularity block {weight.block}, "
                      f"{'asymmetric' if weight.zero_points is not None else 'symmetric'}); torchao here: {SUPPORTED}")


def _fp8_w8a8(codes: torch.Tensor, scales: torch.Tensor, block: list[int], dtype: torch.dtype,
              input_knobs: dict) -> torch.Tensor:
    from torchao.quantization import Float8Tensor, PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import QuantizeTensorToFloat8Kwargs


    if not is_plain_fp8_per_token(input_knobs):
        raise Unsupported("kernel=torchao quantizes activations as fp8_e4m3 per token (absmax, nearest, saturate) "
                          f"only; got {input_knobs}")
    if not (codes.is_cuda and torch.cuda.get_device_capability(codes.device) >= (8, 9)):
        raise Unsupported("torchao's fp8 W8A8 kernel needs a CUDA GPU of compute capability >= 8.9")
    act = QuantizeTensorToFloat8Kwargs(torch.float8_e4m3fn, PerRow())
    return Float8Tensor(codes, scales, block, act_quant_kwargs=act, dtype=dtype)


def torchao_linear(x: torch.Tensor, weight: QuantizedTensor, bias: Optional[torch.Tensor],
                   input_knobs: Optional[dict] = None) -> torch.Tensor:
    _require_torchao()
    key = ("torchao", x.dtype, x.device, None if input_knobs is None else tuple(sorted(input_knobs.items())))
    wrapped = weight.prepared.get(key)
    if wrapped is None:
        wrapped = weight.prepared[key] = _wrap(weight, x.dtype, input_knobs)
    return F.linear(x, wrapped, bias)
