"""Error metrics between a reference tensor and its quantized approximation (in fp64)."""

from __future__ import annotations

import torch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(ref.pow(2).sum() / noise))


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||ref - approx|| / ||ref|| (Frobenius)."""
    ref = reference.double()
    return float((ref - approx.double()).norm() / ref.norm())


def max_abs_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return float((reference.double() - approx.double()).abs().max())
