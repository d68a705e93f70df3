"""Apply a dtype config to a model: cast it, or swap its linear layers for quantized ones."""

from __future__ import annotations

import fnmatch
from typing import Optional

import torch
from torch import nn

from kernels import formats
from kernels.registry import Kernel, get_kernel


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored quantized; its matmul is the chosen kernel."""

    def __init__(self, weight: formats.QuantizedTensor, bias: Optional[torch.Tensor], kernel: Kernel):
        super().__init__()
        self.weight_q = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.kernel = kernel
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight_q, self.bias)

    def _apply(self, fn, recurse=True):
        # Keep the packed codes and scales on the module's device when it moves.
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.weight_q.codes.device)).device
        self.weight_q.codes = self.weight_q.codes.to(device)
        self.weight_q.scales = self.weight_q.scales.to(device)
        return self

    def extra_repr(self) -> str:
        q = self.weight_q
        return f"in={self.in_features}, out={self.out_features}, fmt={q.fmt.name}, block={q.block}"


def _skipped(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) or name.split(".")[-1] == p for p in patterns)


def apply_dtype(model: nn.Module, dtype_cfg: dict, kernel_name: str, compute_dtype: torch.dtype) -> list[dict]:
    """Cast ``model`` to ``compute_dtype`` and quantize its linear weights if the dtype says so.

    Returns one row per quantized layer (name, shape, bytes, bits per element, SQNR dB).
    """
    model.to(compute_dtype)
    fmt = dtype_cfg.get("weight_format")
    if fmt is None:
        return []
    kernel = get_kernel(kernel_name)
    rows = []
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not _skipped(n, dtype_cfg["skip_layers"])]
    for name, linear in targets:
        try:
            q = formats.quantize(linear.weight, fmt, granularity=dtype_cfg["granularity"],
                                 group_size=dtype_cfg["group_size"])
        except formats.FormatError as e:
            raise formats.FormatError(f"layer {name}: {e}") from None
        rows.append({"layer": name, "shape": "x".join(map(str, q.shape)), "bytes": q.nbytes,
                     "bits_per_element": q.bits_per_element,
                     "sqnr_db": formats.sqnr_db(linear.weight, q.dequantize())})
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, QuantizedLinear(q, linear.bias, kernel))
    return rows


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the model holds: parameters plus packed quantized weights."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(m.weight_q.nbytes for m in model.modules() if isinstance(m, QuantizedLinear))
