"""Bit-exact emulation of number formats: casts, scaled quantization, packed storage.

``quantize(x, fmt, **knobs)`` returns a :class:`QuantizedTensor` holding the real storage
(codes packed to their width, and the scales) and ``dequantize()`` gives back exactly
what ``fake_quant(x, fmt, **knobs)`` returns. Everything is vectorised over elements
and blocks.

Rounding ``nearest`` is round-half-to-even on the format's grid, subnormals included;
``stochastic`` rounds up with probability equal to the distance from the lower grid point
(seeded). ``overflow``: ``saturate`` clamps finite overflow and +-Inf to +-max; ``nan``
makes overflow NaN, or +-Inf in formats that have Inf (fp8_e5m2), as IEEE casts do. NaN
inputs stay NaN where the format can encode it.

Scales, by format kind:
- element formats (fp8/fp6/fp4, int8/int4): fp32 scales per tensor, channel (row) or
  group of the last dimension. ``absmax``: scale = max|x| / max (an all-zero block gets
  scale 1); ``mse``: absmax times the clipping ratio in [0.5, 1] with the least squared
  error, per block; ``none``: scale 1, a plain cast. Ints may be asymmetric
  (``symmetric=False``): scale = (hi - lo) / (2**bits - 1) over [min(x, 0), max(x, 0)]
  and a uint8 zero point.
- MX (OCP MX v1.0): blocks of 32 along the last dimension share an E8M0 power-of-two
  scale. ``floor`` is the spec's rule, X = 2**(floor(log2 max|x|) - emax_elem); ``ceil``
  rounds the exponent up when max|x| is not a power of two; ``even`` rounds max|x| to the
  element's mantissa width first (half up, as torchao's EVEN); ``rceil`` (cuBLAS/Blackwell) is
  2**ceil(log2(max|x| / max)), the quotient in fp32. The exponent is clamped to [-127, 127]:
  byte 0 is 2**-127, an fp32 subnormal, and elements are divided by exactly the value their
  byte decodes to. Elements beyond max saturate. A block holding NaN or +-Inf is a NaN block
  (byte 0xFF, element codes 0): E8M0 has no Inf. Checked bit for bit against an exact
  reference written from the spec (``tests/kernels/mx_reference.py``); where torchao differs,
  ``docs/design.md`` says.
- NVFP4: blocks of 16 share an E4M3 scale (at least E4M3's smallest normal, 2**-6), under an
  fp32 per-tensor scale max|x| / (448 * 6), as torchao's ``nvfp4_quantize`` does (an all-zero
  tensor, where that reference divides by zero, gets per-tensor scale 1). The tensor scale
  is at least 2**-121 so that the reciprocal below stays finite (torchao's overflows there:
  95% error on tensors near 2**-120, NaN near 2**-149): magnitudes below 2**-129 become signed
  zeros. A block holding NaN or +-Inf gets the
  E4M3 NaN scale (0x7F) and codes 0; the tensor scale comes from the finite values.

A last dimension that a group or block does not divide is refused, not padded: a padded
block changes the scale of the real elements around it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from kernels import packing
from kernels.catalog import (FORMATS, GRANULARITIES, BlockSpec, FloatSpec, Format, IntSpec, KnobError,
                             check_knobs, default_scale_rules)

__all__ = ["FORMATS", "GRANULARITIES", "FormatError", "KnobError", "QuantizedTensor", "Scales", "block_length",
           "cast", "choose_scales", "decode", "encode", "fake_quant", "nvfp4_tensor_scale", "quantize", "value_table"]

MSE_RATIOS = 26  # clipping ratios tried by scale_rule=mse, evenly from 1.0 down to 0.5
# NVFP4 multiplies by (1 / tensor_scale) / block_scale, as torchao and the MSLK kernel do; with
# the smallest block scale (E4M3's smallest normal, 2**-6) that stays finite down to here.
NVFP4_MIN_TENSOR_SCALE = 2.0 ** -121


class FormatError(ValueError):
    """An input the numerics cannot handle (dtype, shape, NaN where none can be encoded)."""


# ----------------------------------------------------------------------------- element grids

@functools.cache
def value_table(spec: FloatSpec | IntSpec) -> torch.Tensor:
    """fp32 value of every code of an element format, indexed by code (a few hundred at most)."""
    codes = range(2 ** spec.bits)
    if isinstance(spec, IntSpec):
        signed = [c - 2 ** spec.bits if c >= 2 ** (spec.bits - 1) else c for c in codes]
        return torch.tensor(signed, dtype=torch.float64).mul(spec.step).float()
    top_exp, top_mant = 2 ** spec.ebits - 1, 2 ** spec.mbits - 1
    values = []
    for code in codes:
        sign = -1.0 if code >> (spec.ebits + spec.mbits) else 1.0
        exp, mant = (code >> spec.mbits) & top_exp, code & top_mant
        if spec.has_inf and exp == top_exp:  # IEEE-style: Inf and NaNs in the top binade
            value = float("inf") if mant == 0 else float("nan")
        elif spec.has_nan and not spec.has_inf and exp == top_exp and mant == top_mant:  # E4M3FN: one NaN
            value = float("nan")
        elif exp == 0:
            value = mant * 2.0 ** (spec.emin - spec.mbits)
        else:
            value = (1 + mant / 2 ** spec.mbits) * 2.0 ** (exp - spec.bias)
        values.append(sign * value)
    return torch.tensor(values, dtype=torch.float32)


@functools.cache
def _e8m0_table(device: torch.device) -> torch.Tensor:
    """fp32 value of every E8M0 byte, built from bits: 2**(b - 127), b = 0 the fp32 subnormal
    2**-127, b = 255 NaN. The quantizer divides by these very values, so codes and decoded
    scales cannot disagree."""
    b = torch.arange(256, dtype=torch.int32)
    bits = torch.where(b == 0, 0x00400000, torch.where(b == 255, 0x7FC00000, b << 23))
    return bits.view(torch.float32).to(device)


def _uniform(shape, like: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=like.device).manual_seed(seed)
    return torch.rand(shape, generator=gen, device=like.device, dtype=torch.float32)


def _round(k: torch.Tensor, rounding: str, seed: int) -> torch.Tensor:
    """Round to an integer: half to even, or up with probability frac(k) (sign-symmetric on |k|)."""
    if rounding == "nearest":
        return torch.round(k)
    return torch.floor(k + _uniform(k.shape, k, seed))


def _max_code(spec: FloatSpec) -> int:
    """Magnitude code of the largest finite value."""
    if spec.has_inf:  # IEEE-style: the top binade holds Inf and NaNs
        return 2 ** (spec.bits - 1) - 2 ** spec.mbits - 1
    return 2 ** (spec.bits - 1) - (2 if spec.has_nan else 1)  # E4M3FN: only S.1111.111 is NaN


def _nan_code(spec: FloatSpec) -> int:
    return 2 ** (spec.bits - 1) - 1  # S.111..1: NaN in both E4M3FN and E5M2


def _round_float(v: torch.Tensor, spec: FloatSpec, rounding: str, overflow: str,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, fp32 values) of fp32 ``v`` rounded onto the minifloat's grid.

    With e = max(floor(log2|v|), emin), |v| * 2**(mbits - e) is exact (a power-of-two
    scaling), and its integer rounding k is the significand: the value is k * 2**(e - mbits)
    and the magnitude code is (e - emin) * 2**mbits + k, for subnormals too (e = emin,
    k < 2**mbits), and when k rounds up into the next binade.
    """
    a = v.abs()
    exp = torch.clamp((a.view(torch.int32) >> 23) - 127, spec.emin, 127)  # fp32 exponent field of a >= 0
    up = ((127 + spec.mbits - exp) << 23).view(torch.float32)  # 2**(mbits - exp), built from its bits
    k = _round(a * up, rounding, seed)
    magnitude = (exp - spec.emin).float() * 2 ** spec.mbits + k
    max_code = _max_code(spec)
    over = magnitude > max_code  # False for NaN; True for Inf
    values = k / up
    if overflow == "saturate":
        magnitude = torch.where(over, max_code, magnitude)
        values = torch.where(over, spec.max, values)
    else:
        magnitude = torch.where(over, max_code + 1 if spec.has_inf else _nan_code(spec), magnitude)
        values = torch.where(over, float("inf") if spec.has_inf else float("nan"), values)
    nan = torch.isnan(a)
    magnitude = torch.where(nan, _nan_code(spec) if spec.has_nan else 0, magnitude)
    codes = magnitude.to(torch.int32) | (torch.signbit(v).to(torch.int32) << (spec.bits - 1))
    return codes.to(torch.uint8), torch.copysign(values, v)


def _round_element(v: torch.Tensor, spec: FloatSpec | IntSpec, rounding: str, overflow: str, seed: int,
                   unsigned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, values on the grid) of fp32 ``v`` in the element format."""
    if isinstance(spec, FloatSpec):
        return _round_float(v, spec, rounding, overflow, seed)
    if unsigned:
        q = torch.clamp(_round(v, rounding, seed), 0, 2 ** spec.bits - 1)
        return q.to(torch.uint8), q
    q = torch.clamp(_round(v / spec.step, rounding, seed), -spec.qmax, spec.qmax)
    return (q.to(torch.int16) & (2 ** spec.bits - 1)).to(torch.uint8), q * spec.step


def cast(x: torch.Tensor, fmt: str, rounding: str = "nearest", overflow: str = "saturate",
         seed: int = 0) -> torch.Tensor:
    """An unscaled cast of ``x`` onto a minifloat's grid (fp32 result): like ``x.to(float8_e4m3fn)``."""
    spec = check_knobs(fmt, granularity="per_tensor", rounding=rounding, overflow=overflow)
    if not isinstance(spec, FloatSpec):
        raise KnobError("format", fmt, tuple(n for n, s in FORMATS.items() if isinstance(s, FloatSpec)))
    _check_input(x, spec)
    return _round_float(x.float(), spec, rounding, overflow, seed)[1]


# ----------------------------------------------------------------------------- quantized tensors

@dataclass(eq=False)  # hashed by identity: kernels key their prepared layouts on the input knobs
class Scales:
    """One scale per block, as the format stores it: fp32 (element formats; uint8 zero points
    when asymmetric), E8M0 exponent bytes (MX), or E4M3 bytes under an fp32 tensor scale (NVFP4).

    Chosen apart from the codes (:func:`choose_scales`), so that a method can fix a block's
    scale first and round its elements later (GPTQ), and a static activation scale can be
    chosen on calibration data and used on every input after.
    """
    scales: torch.Tensor
    zero_points: Optional[torch.Tensor] = None
    tensor_scale: Optional[torch.Tensor] = None

    def to(self, device: torch.device | str) -> "Scales":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Scales(self.scales.to(device), move(self.zero_points), move(self.tensor_scale))

    def take(self, index: torch.Tensor) -> "Scales":
        """The scales of blocks ``index`` (the tensor scale is shared)."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Scales(self.scales[index], pick(self.zero_points), self.tensor_scale)

    def values(self, spec: Format) -> torch.Tensor:
        """The fp32 scale of every block."""
        if not isinstance(spec, BlockSpec):
            return self.scales
        if spec.scale == "e8m0":
            return _e8m0_table(self.scales.device)[self.scales.long()]
        return self.tensor_scale * value_table(FORMATS["fp8_e4m3"]).to(self.scales.device)[self.scales.long()]


@dataclass
class QuantizedTensor:
    """Packed codes plus scales. ``scales`` is fp32 per block for element formats, the
    E8M0 exponent bytes (MX) or the E4M3 bytes (NVFP4, under ``tensor_scale``)."""
    codes: torch.Tensor
    scales: torch.Tensor
    spec: Format
    shape: torch.Size
    block: int  # consecutive elements (row-major) that share one scale
    zero_points: Optional[torch.Tensor] = None
    tensor_scale: Optional[torch.Tensor] = None
    # Kernel-specific layouts of this weight, made on first use (e.g. torchao's tensors).
    prepared: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: Scales, spec: Format, shape: torch.Size) -> "QuantizedTensor":
        """Pack unpacked ``codes`` ([blocks, block], as :func:`encode` gives them) with their scales."""
        return cls(packing.pack(codes, spec.bits), scales.scales, spec, torch.Size(shape), codes.shape[1],
                   scales.zero_points, scales.tensor_scale)

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedTensor(move(self.codes), move(self.scales), self.spec, self.shape, self.block,
                               move(self.zero_points), move(self.tensor_scale))

    @property
    def element(self) -> FloatSpec | IntSpec:
        return self.spec.element if isinstance(self.spec, BlockSpec) else self.spec

    @property
    def block_scales(self) -> Scales:
        return Scales(self.scales, self.zero_points, self.tensor_scale)

    @property
    def nbytes(self) -> int:
        parts = (self.codes, self.scales, self.zero_points, self.tensor_scale)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def bits_per_element(self) -> float:
        """Storage bits per element, scales and zero points included."""
        return 8 * self.nbytes / self.shape.numel()

    def element_codes(self) -> torch.Tensor:
        """The unpacked codes (uint8 bit patterns), shape ``self.shape``."""
        return packing.unpack(self.codes, self.element.bits, self.shape.numel()).view(self.shape)

    def scale_values(self) -> torch.Tensor:
        """The fp32 scale of every block."""
        return self.block_scales.values(self.spec)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.element_codes().reshape(-1, self.block)
        return decode(codes, self.spec, self.block_scales).reshape(self.shape).to(dtype)


def _check_input(x: torch.Tensor, element: FloatSpec | IntSpec) -> None:
    if not x.is_floating_point():
        raise FormatError(f"expected a floating-point tensor, got {x.dtype}")
    nan_ok = isinstance(element, FloatSpec) and element.has_nan
    if not nan_ok and torch.isnan(x).any():
        raise FormatError(f"the input holds NaN, which {element.name} cannot encode")


def block_length(shape: torch.Size, spec: Format, granularity: str, group_size: int) -> int:
    """Consecutive elements (row-major) sharing one scale; refuses a last dimension the group
    or block does not divide."""
    if len(shape) == 0:
        raise FormatError("expected a tensor with at least one dimension, got a scalar")
    last = shape[-1]
    if isinstance(spec, BlockSpec):
        granularity, group_size = "per_block", spec.block
    block = {"per_tensor": shape.numel(), "per_channel": last}.get(granularity, group_size)
    if last % block and granularity in ("per_group", "per_block"):
        raise FormatError(f"group_size={block} does not divide the last dimension {last} of shape "
                          f"{tuple(shape)}; pad the tensor or choose a group size that divides it")
    return block


def quantize(x: torch.Tensor, fmt: str, granularity: Optional[str] = None, group_size: int = 128,
             rounding: str = "nearest", scale_rule: Optional[str] = None, overflow: str = "saturate",
             symmetric: bool = True, seed: int = 0, scales: Optional[Scales] = None) -> QuantizedTensor:
    """Quantize ``x`` to format ``fmt`` (a name in ``kernels.catalog.FORMATS``); knobs as in the module doc.

    ``granularity`` defaults to ``per_block`` for block formats and ``per_channel`` otherwise;
    ``scale_rule`` to the format's first allowed rule (absmax, or floor for MX). ``scales``,
    if given, are used instead of choosing them from ``x`` (a static activation scale): one
    per block, or a single one for every block.
    """
    spec = FORMATS.get(fmt)
    if granularity is None:
        granularity = "per_block" if isinstance(spec, BlockSpec) else "per_channel"
    spec = check_knobs(fmt, granularity, group_size, rounding, scale_rule, overflow, symmetric)
    _check_input(x, FORMATS["fp8_e4m3"] if isinstance(spec, BlockSpec) else spec)  # block NaN: in the scale
    blocks = x.float().reshape(-1, block_length(x.shape, spec, granularity, group_size))
    if scales is None:
        scales = choose_scales(blocks, spec, scale_rule or default_scale_rules(spec)[0], symmetric)
    else:
        scales = scales.to(blocks.device)
        if scales.scales.numel() == 1:
            scales = scales.take(torch.zeros(blocks.shape[0], dtype=torch.long, device=blocks.device))
    return QuantizedTensor.from_codes(encode(blocks, spec, scales, rounding, overflow, seed), scales, spec, x.shape)


def choose_scales(blocks: torch.Tensor, spec: Format, scale_rule: str, symmetric: bool = True,
                  tensor_scale: Optional[torch.Tensor] = None) -> Scales:
    """Each block's scale (fp32 ``blocks`` [blocks, block]) by the format's rule. NVFP4 takes
    the fp32 tensor scale of the whole tensor these blocks are part of, if they are not all of it."""
    if isinstance(spec, BlockSpec):
        if spec.scale == "e8m0":
            return _mx_scales(blocks, spec.element, scale_rule)
        return _nvfp4_scales(blocks, spec.element, tensor_scale)
    if not symmetric:
        lo = torch.clamp(blocks.amin(dim=1), max=0)  # the range holds 0, so 0 is exact
        hi = torch.clamp(blocks.amax(dim=1), min=0)
        scales = torch.where(hi > lo, (hi - lo) / (2 ** spec.bits - 1), torch.ones_like(hi))
        return Scales(scales, zero_points=torch.clamp(torch.round(-lo / scales), 0, 2 ** spec.bits - 1).to(torch.uint8))
    if scale_rule == "none":
        return Scales(torch.ones(blocks.shape[0], device=blocks.device))
    amax = blocks.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / spec.max, torch.ones_like(amax))
    if scale_rule == "mse":
        scales = scales * _mse_ratio(blocks, scales, spec)
    return Scales(scales)


def encode(blocks: torch.Tensor, spec: Format, scales: Scales, rounding: str = "nearest",
           overflow: str = "saturate", seed: int = 0) -> torch.Tensor:
    """Unpacked codes (uint8, the shape of fp32 ``blocks`` [blocks, block]) of each block under its scale."""
    if isinstance(spec, BlockSpec):
        if spec.scale == "e8m0":
            special = scales.scales == 255  # a NaN block: codes 0
            codes, _ = _round_element(blocks / scales.values(spec)[:, None], spec.element, rounding, overflow, seed)
        else:
            special = scales.scales == _nan_code(FORMATS["fp8_e4m3"])
            block_scale = value_table(FORMATS["fp8_e4m3"]).to(blocks.device)[scales.scales.long()]
            scaled = torch.where(special[:, None], 0.0, blocks) * ((1.0 / scales.tensor_scale) / block_scale)[:, None]
            codes, _ = _round_element(scaled, spec.element, rounding, "saturate", seed)
        return torch.where(special[:, None], 0, codes).to(torch.uint8)
    if scales.zero_points is not None:
        shifted = blocks / scales.scales[:, None] + scales.zero_points.float()[:, None]
        return _round_element(shifted, spec, rounding, "saturate", seed, unsigned=True)[0]
    # No division by a scale of 1 (a plain cast): x / 1 loses the sign of a NaN on CUDA.
    s = scales.scales[:, None]
    return _round_element(torch.where(s == 1, blocks, blocks / s), spec, rounding, overflow, seed)[0]


def decode(codes: torch.Tensor, spec: Format, scales: Scales) -> torch.Tensor:
    """fp32 values of unpacked ``codes`` [blocks, block] under their blocks' scales."""
    if scales.zero_points is not None:
        values = codes.float() - scales.zero_points.float()[:, None]
    else:
        element = spec.element if isinstance(spec, BlockSpec) else spec
        values = value_table(element).to(codes.device)[codes.long()]
    return values * scales.values(spec)[:, None]


def _mse_ratio(blocks: torch.Tensor, scales: torch.Tensor, spec: FloatSpec | IntSpec) -> torch.Tensor:
    """Per block, the clipping ratio (of absmax) whose round-to-nearest has the least squared error."""
    best_err = torch.full_like(scales, float("inf"))
    best = torch.ones_like(scales)
    for ratio in torch.linspace(1.0, 0.5, MSE_RATIOS).tolist():
        s = scales * ratio
        _, grid = _round_element(blocks / s[:, None], spec, "nearest", "saturate", 0)
        err = (grid * s[:, None] - blocks).pow(2).sum(dim=1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, ratio, best)
    return best


def _element_mbits(element: FloatSpec | IntSpec) -> int:
    # MXINT8's elements are 1.xxxxxx: six fraction bits play the mantissa's part.
    return element.mbits if isinstance(element, FloatSpec) else round(-math.log2(element.step))


def _shared_exponent(amax: torch.Tensor, element: FloatSpec | IntSpec, rule: str) -> torch.Tensor:
    """Unbiased E8M0 exponent of each block (int32, clamped to [-127, 127]) from its finite max|x|."""
    if rule == "rceil":
        amax = amax / element.max  # the fp32 descale, which is then rounded up to a power of two
    mant, exp = torch.frexp(amax)  # amax = mant * 2**exp, mant in [0.5, 1): exact for subnormals too
    floor_log2 = exp - 1
    if rule == "floor":
        e = floor_log2 - element.emax
    elif rule == "even":  # max|x| rounded (half up) to the element's mantissa width may reach 2**(floor+1)
        e = floor_log2 + (mant >= 1 - 2.0 ** -(_element_mbits(element) + 2)).int() - element.emax
    else:  # ceil, rceil: up unless a power of two
        e = floor_log2 + (mant != 0.5).int() - (element.emax if rule == "ceil" else 0)
    return torch.where(amax > 0, e, -127).clamp(-127, 127)


def _mx_scales(blocks: torch.Tensor, element: FloatSpec | IntSpec, rule: str) -> Scales:
    special = ~torch.isfinite(blocks).all(dim=1)  # E8M0 has no Inf: NaN or Inf makes the block NaN
    amax = torch.where(special, 0.0, blocks.abs().amax(dim=1))
    return Scales(torch.where(special, 255, _shared_exponent(amax, element, rule) + 127).to(torch.uint8))


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """NVFP4's fp32 per-tensor scale, shape [1], from the finite values of ``x``."""
    e4m3, fp4 = FORMATS["fp8_e4m3"], FORMATS["fp4_e2m1"]
    amax = torch.where(torch.isfinite(x), x.float(), 0.0).abs().amax()
    return torch.where(amax > 0, torch.clamp(amax / (e4m3.max * fp4.max), min=NVFP4_MIN_TENSOR_SCALE),
                       torch.ones_like(amax)).reshape(1)


def _nvfp4_scales(blocks: torch.Tensor, element: FloatSpec, tensor_scale: Optional[torch.Tensor]) -> Scales:
    e4m3 = FORMATS["fp8_e4m3"]
    special = ~torch.isfinite(blocks).all(dim=1)  # NaN or Inf makes its block NaN, not the whole tensor
    blocks = torch.where(special[:, None], 0.0, blocks)
    if tensor_scale is None:
        tensor_scale = nvfp4_tensor_scale(blocks)
    block_scale = blocks.abs().amax(dim=1) / element.max / tensor_scale
    scale_codes, _ = _round_float(torch.clamp(block_scale, min=2.0 ** e4m3.emin, max=e4m3.max), e4m3,
                                  "nearest", "saturate", 0)
    return Scales(torch.where(special, _nan_code(e4m3), scale_codes).to(torch.uint8), tensor_scale=tensor_scale)


def fake_quant(x: torch.Tensor, fmt: str, **knobs) -> torch.Tensor:
    """``x`` rounded onto the format's grid and dequantized: same shape and dtype as ``x``."""
    return quantize(x, fmt, **knobs).dequantize(x.dtype)
