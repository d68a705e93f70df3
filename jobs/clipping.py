"""Activation-aware clipping (AWQ's ``auto_clip``, Lin et al., MLSys 2024): each block's scale taken
from its largest weight shrunk by the ratio, on a grid from 1 down to ``method.clip_min``, whose
rounding gives the least error in the layer's output on the calibration inputs, not in the weights.

llm-awq measures a block's error on a sample of the calibration tokens; here it is exact over all of
them, from the inputs' second moment H: block (row r, columns g) costs ``d H_gg d^T`` with ``d`` its
rounding error. That leaves out how blocks of one row interact, so the chosen scales are kept only
if the layer's whole output error is no worse than under the format's own scales.

The ratio shrinks what the format's own scale rule is given (a block's amax for int and NVFP4
blocks; MX's power-of-two scale moves only where the ratio crosses one). NVFP4's tensor scale stays
the unclipped weight's. Values past a clipped scale saturate.
"""

from __future__ import annotations

import torch

from jobs.config import DtypeConfig, MethodConfig
from jobs.gptq import output_error
from kernels import formats
from kernels.catalog import BlockSpec, check_knobs, default_scale_rules


def clip_scales(weight: torch.Tensor, hessian: torch.Tensor, dtype_cfg: DtypeConfig,
                method: MethodConfig) -> tuple[formats.Scales, torch.Tensor]:
    """(the scales of ``weight`` [out, in] with each block's searched clip, the ratio chosen per block)."""
    spec = check_knobs(dtype_cfg.format, dtype_cfg.granularity, dtype_cfg.group_size, "nearest",
                       dtype_cfg.scale_rule, "saturate", dtype_cfg.symmetric)
    rule = dtype_cfg.scale_rule or default_scale_rules(spec)[0]
    W = weight.detach().float()
    rows, cols = W.shape
    block = formats.block_length(W.shape, spec, dtype_cfg.granularity, dtype_cfg.group_size)
    blocks = W.reshape(-1, block)
    group = min(block, cols)  # columns of a row under one scale (a per-tensor block spans every row)
    H = hessian.to(W.device, torch.float32)
    diagonal_blocks = torch.stack([H[g:g + group, g:g + group] for g in range(0, cols, group)])
    tensor_scale = formats.nvfp4_tensor_scale(W) if isinstance(spec, BlockSpec) and spec.scale == "e4m3" else None

    def scales_for(ratio: torch.Tensor) -> formats.Scales:
        return formats.choose_scales(blocks * ratio[:, None], spec, rule, dtype_cfg.symmetric, tensor_scale)

    def rounded(scales: formats.Scales) -> torch.Tensor:
        return formats.decode(formats.encode(blocks, spec, scales), spec, scales)

    def block_errors(scales: formats.Scales) -> torch.Tensor:
        d = (rounded(scales) - blocks).reshape(rows, -1, group)
        per_row_group = torch.einsum("rgi,gij,rgj->rg", d, diagonal_blocks, d)
        return per_row_group.reshape(blocks.shape[0], -1).sum(dim=1) if block >= cols else per_row_group.reshape(-1)

    ratios = [1 - (1 - method.clip_min) * k / method.clip_grid for k in range(method.clip_grid + 1)]
    unclipped = torch.ones(blocks.shape[0], device=W.device)
    own = scales_for(unclipped)
    best_ratio, best_error = unclipped, block_errors(own)
    for r in ratios[1:]:
        ratio = torch.full_like(best_ratio, r)
        error = block_errors(scales_for(ratio))
        better = error < best_error
        best_ratio, best_error = torch.where(better, ratio, best_ratio), torch.where(better, error, best_error)
    # Blocks of one row interact through H's off-diagonal blocks, which the search leaves out: keep the
    # format's own scales where the chosen ones lose on the layer's whole output error.
    chosen = scales_for(best_ratio)
    if output_error(W, rounded(chosen).reshape(W.shape), H) > output_error(W, rounded(own).reshape(W.shape), H):
        return own, unclipped
    return chosen, best_ratio
