"""Kernel names -> functions computing ``y = x @ W.T + b`` with a quantized weight.

A kernel takes (activations, QuantizedTensor, bias) and returns activations of the
input's dtype. ``torch`` is the reference every other kernel is checked against.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from kernels import catalog
from kernels.formats import QuantizedTensor

Kernel = Callable[[torch.Tensor, QuantizedTensor, Optional[torch.Tensor]], torch.Tensor]


def torch_reference(x: torch.Tensor, weight: QuantizedTensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Dequantize the weight to the activations' dtype, then a plain matmul."""
    return F.linear(x, weight.dequantize(x.dtype), bias)


KERNELS: dict[str, Kernel] = {"torch": torch_reference}


def get_kernel(name: str) -> Kernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; allowed: {', '.join(KERNELS)}") from None
