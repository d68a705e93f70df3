"""GPTQ for every format in kernels/formats.py: one linear layer's weight from its calibration Hessian.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (ICLR 2023), as its reference code (IST-DASLab/gptq, ``gptq.py: fasterquant``)
does it: columns are rounded one at a time, in order (or by descending Hessian diagonal,
``act_order``), and each one's rounding error is spread over the columns not yet rounded through
the upper Cholesky factor of the damped inverse Hessian; ``block_size`` columns are rounded
before the rest of the matrix is updated (lazy batch updates). Dead inputs (a zero Hessian
diagonal) get zero weights, as there.

The format decides the scales, never the method: each group of a row (an int group, an MX or
NVFP4 block) gets the scale the format's own rule gives it. Groups take their scale when GPTQ
reaches their first column, from the weights as updated so far (the reference's behaviour), or,
with ``static_groups`` or ``act_order``, all from the unrounded weight first, so that a column
order across groups still stores the format's layout. Per-channel and per-tensor scales are
always taken first. NVFP4's tensor scale comes from the unrounded weight. The result is a
:class:`~kernels.formats.QuantizedTensor` like any other, so every kernel runs it.

With an identity Hessian no error moves to another column, and GPTQ's codes are round-to-nearest's.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from jobs.config import DtypeConfig, GptqOptions
from kernels import formats
from kernels.catalog import BlockSpec, check_knobs, default_scale_rules


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, dtype_cfg: DtypeConfig, options: GptqOptions,
                  scales: Optional[formats.Scales] = None) -> formats.QuantizedTensor:
    """``weight`` [out, in] quantized to the dtype's format, minimising ``tr(dW H dW^T)`` for the
    layer inputs' second moment ``hessian`` [in, in]; under the given block ``scales`` (searched
    clipping), else under the format's rule. Runs on the weight's device."""
    spec = check_knobs(dtype_cfg.format, dtype_cfg.granularity, dtype_cfg.group_size, "nearest",
                       dtype_cfg.scale_rule, dtype_cfg.overflow, dtype_cfg.symmetric)
    rule = dtype_cfg.scale_rule or default_scale_rules(spec)[0]
    rows, cols = weight.shape
    block = formats.block_length(weight.shape, spec, dtype_cfg.granularity, dtype_cfg.group_size)
    per_tensor = block == weight.numel()
    group = cols if per_tensor else block  # columns of a row under one scale
    groups = cols // group
    W = weight.detach().float().clone()
    if not torch.isfinite(W).all():
        raise formats.FormatError("GPTQ needs finite weights")
    tensor_scale = formats.nvfp4_tensor_scale(W) if isinstance(spec, BlockSpec) and spec.scale == "e4m3" else None

    H = hessian.detach().to(W.device, torch.float32).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = options.static_groups or options.act_order or groups == 1 or scales is not None
    if static:
        fixed = scales.to(W.device) if scales is not None else formats.choose_scales(
            W.reshape(-1, block), spec, rule, dtype_cfg.symmetric, tensor_scale)
        row_index = torch.arange(rows, device=W.device)
        by_group = [fixed.take(torch.zeros_like(row_index) if per_tensor else row_index * groups + g)
                    for g in range(groups)]
    else:
        by_group = [None] * groups
    order = torch.argsort(H.diagonal(), descending=True) if options.act_order else torch.arange(cols, device=W.device)
    W, H = W[:, order], H[order][:, order]
    H.diagonal().add_(options.damp * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    columns = order.tolist()  # once: a device tensor read per column would synchronise each time
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    # Dynamic groups take their scale at their first column from the updated weights: blocks hold whole groups.
    step = options.block_size if static else math.lcm(options.block_size, group)
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = columns[i1 + i]
            g = col // group
            if not static and col % group == 0:
                by_group[g] = formats.choose_scales(W1[:, i:i + group], spec, rule, dtype_cfg.symmetric, tensor_scale)
            column_codes = formats.encode(W1[:, i:i + 1], spec, by_group[g], "nearest", dtype_cfg.overflow)
            q = formats.decode(column_codes, spec, by_group[g])[:, 0]
            codes[:, col] = column_codes[:, 0]
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if static:
        scales = fixed
    else:  # block r * groups + g is group g of row r
        stack = lambda parts: None if parts[0] is None else torch.stack(parts, dim=1).reshape(-1)  # noqa: E731
        scales = formats.Scales(stack([s.scales for s in by_group]), stack([s.zero_points for s in by_group]),
                                tensor_scale)
    return formats.QuantizedTensor.from_codes(codes.reshape(-1, block), scales, spec, weight.shape)


def weighted_error(weight: torch.Tensor, effective: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``tr(dW H dW^T)``: the summed squared output error over the inputs whose second moment is ``hessian``."""
    delta = weight.float() - effective.float().to(weight.device)
    return ((delta @ hessian) * delta).sum()


def output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||X W^T - X Q^T||^2 / ||X W^T||^2`` over the calibration inputs X, from ``hessian`` = X^T X."""
    W = weight.detach().float()
    H = hessian.to(W.device, torch.float32)
    num = weighted_error(W, dequantized, H)
    den = ((W @ H) * W).sum()
    return float(num / den) if den > 0 else math.nan
