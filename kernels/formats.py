"""Integer weight formats with absmax scales, and the tensors that hold them packed.

``quantize`` returns a :class:`QuantizedTensor` holding the real storage (int8 codes, or
int4 codes packed two per byte) and fp32 scales; ``dequantize`` on it gives exactly what
``fake_quant`` gives. Rounding is round-half-to-even (``torch.round``), the scale rule is
absmax: ``scale = max|x| / qmax`` per scale block, so the largest magnitude maps to qmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.catalog import FORMATS, GRANULARITIES, IntFormat


class FormatError(ValueError):
    """A format, knob or input the numerics cannot handle."""


def get_format(name: str) -> IntFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(f"unknown format {name!r}; allowed: {', '.join(FORMATS)}") from None


def _block_size(shape: torch.Size, granularity: str, group_size: int) -> int:
    """Number of consecutive elements along the last dim that share one scale."""
    if len(shape) != 2:
        raise FormatError(f"expected a 2-D weight [out, in], got shape {tuple(shape)}")
    cols = shape[1]
    if granularity == "per_tensor":
        return shape[0] * cols
    if granularity == "per_channel":
        return cols
    if granularity == "per_group":
        # Refuse rather than pad: a padded group changes the scale of real elements.
        if group_size < 1 or cols % group_size:
            raise FormatError(
                f"group_size={group_size} does not divide the input dimension {cols} "
                f"of a weight of shape {tuple(shape)}")
        return group_size
    raise FormatError(f"unknown granularity {granularity!r}; allowed: {', '.join(GRANULARITIES)}")


def _check_float(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise FormatError(f"expected a floating-point tensor, got {x.dtype}")


@dataclass
class QuantizedTensor:
    codes: torch.Tensor   # int8 [rows, cols] for int8; uint8 [rows, cols // 2] for int4
    scales: torch.Tensor  # fp32, one per block, shape [rows * cols // block]
    fmt: IntFormat
    shape: torch.Size
    block: int

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / self.shape.numel()

    def int_codes(self) -> torch.Tensor:
        """Signed integer codes, unpacked, shape ``self.shape``."""
        return unpack_int4(self.codes) if self.fmt.bits == 4 else self.codes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        blocks = self.int_codes().reshape(-1, self.block).float() * self.scales[:, None]
        return blocks.reshape(self.shape).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit codes per byte: element 2i in the low nibble, 2i+1 in the high."""
    if codes.shape[-1] % 2:
        raise FormatError(f"int4 packing needs an even last dimension, got {tuple(codes.shape)}")
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2).to(torch.int8)
    return (nibbles ^ 8) - 8  # sign-extend the 4-bit two's complement


def quantize(x: torch.Tensor, fmt: str, granularity: str = "per_channel", group_size: int = 128) -> QuantizedTensor:
    _check_float(x)
    f = get_format(fmt)
    block = _block_size(x.shape, granularity, group_size)
    blocks = x.detach().float().reshape(-1, block)
    amax = blocks.abs().amax(dim=1)
    # An all-zero block gets scale 1 so its codes are 0 and dequantize to exact zeros.
    scales = torch.where(amax > 0, amax / f.qmax, torch.ones_like(amax))
    codes = torch.round(blocks / scales[:, None]).clamp_(-f.qmax, f.qmax).to(torch.int8).reshape(x.shape)
    if f.bits == 4:
        codes = pack_int4(codes)
    return QuantizedTensor(codes=codes, scales=scales, fmt=f, shape=x.shape, block=block)


def fake_quant(x: torch.Tensor, fmt: str, **knobs) -> torch.Tensor:
    """``x`` rounded onto the format's grid and dequantized: same shape and dtype as ``x``."""
    return quantize(x, fmt, **knobs).dequantize(x.dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
