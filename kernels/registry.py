"""Kernel names -> functions computing ``y = q(x) @ dequant(W).T + b``.

A kernel takes (activations, QuantizedTensor, bias, input_knobs) and returns activations
of the input's dtype; ``input_knobs`` (or None) are the ``fake_quant`` knobs of the
activations: per token, or one static scale (``scales``) for all. ``torch`` is the reference every other kernel is
checked against; ``triton`` dispatches on the weight's format and raises
:class:`~kernels.catalog.Unsupported` for what it does not implement; ``torchao`` runs
torchao's kernels on the same codes and scales (``kernels/torchao_kernels.py``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from kernels import formats
from kernels.catalog import Unsupported, is_plain_fp8_per_token, is_plain_fp8_static
from kernels.formats import QuantizedTensor
from kernels.torchao_kernels import torchao_linear

Kernel = Callable[[torch.Tensor, QuantizedTensor, Optional[torch.Tensor], Optional[dict]], torch.Tensor]
# Relative error (Frobenius) a kernel may show against the torch reference, by activation
# dtype: a few roundings of the output dtype (fp32 allows for tf32 dots on GPUs).
TOLERANCE = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def torch_reference(x: torch.Tensor, weight: QuantizedTensor, bias: Optional[torch.Tensor],
                    input_knobs: Optional[dict] = None) -> torch.Tensor:
    """Fake-quantize the activations if asked, dequantize the weight, then a plain matmul."""
    if input_knobs is not None:
        x = formats.fake_quant(x, **input_knobs)
    return F.linear(x, weight.dequantize(x.dtype), bias)


def triton_kernels(x: torch.Tensor, weight: QuantizedTensor, bias: Optional[torch.Tensor],
                   input_knobs: Optional[dict] = None) -> torch.Tensor:
    from kernels import fp8_matmul, mx_matmul, wint_matmul

    name = weight.spec.name
    if input_knobs is not None:
        if name == "fp8_e4m3" and is_plain_fp8_per_token(input_knobs):
            return fp8_matmul.fp8_w8a8_linear(x, weight, bias)
        if name == "fp8_e4m3" and is_plain_fp8_static(input_knobs):
            return fp8_matmul.fp8_w8a8_linear(x, weight, bias, input_knobs["scales"].scales)
        raise Unsupported(f"the triton kernels quantize activations only for fp8_e4m3 W8A8 (per token, absmax, or "
                          f"one static scale; nearest, saturate), not {input_knobs['fmt']} activations with {name} "
                          f"weights")
    if name in ("int4", "int8"):
        return wint_matmul.wint_linear(x, weight, bias)
    if name in mx_matmul.ELEMENTS:
        return mx_matmul.mx_linear(x, weight, bias)
    raise Unsupported(f"no triton kernel for {name} weights (weight-only); triton has int4/int8 (W4A16, W8A16), "
                      f"{', '.join(mx_matmul.ELEMENTS)}, and fp8_e4m3 with quant=w_a_dynamic (W8A8)")


KERNELS: dict[str, Kernel] = {"torch": torch_reference, "triton": triton_kernels, "torchao": torchao_linear}


def get_kernel(name: str) -> Kernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; allowed: {', '.join(KERNELS)}") from None


def reference_fp64(x: torch.Tensor, weight: QuantizedTensor, input_knobs: Optional[dict] = None) -> torch.Tensor:
    """What every kernel should compute, in fp64: the activations quantized as the kernel
    quantizes them (in their own dtype), times the exactly dequantized weight."""
    x_ref = x if input_knobs is None else formats.fake_quant(x, **input_knobs)
    return F.linear(x_ref.double(), weight.dequantize(torch.float64))


def kernel_relative_error(name: str, weight: QuantizedTensor, dtype: torch.dtype, input_knobs: Optional[dict],
                          rows: int = 17, seed: int = 0) -> float:
    """Relative error of kernel ``name`` against :func:`reference_fp64` on random activations
    (an odd number of rows, to exercise the masks)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, weight.shape[1], generator=gen).to(dtype).to(weight.codes.device)
    ref = reference_fp64(x, weight, input_knobs)
    out = get_kernel(name)(x, weight, None, input_knobs)
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))
