"""Number formats and quantization knobs, as data: importable without torch.

The control plane validates configs with :func:`check_knobs` before anything is
submitted; ``kernels.formats`` builds the numerics from the same specs and calls the
same check, so the two can never disagree about what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union


@dataclass(frozen=True)
class FloatSpec:
    """A sign-exponent-mantissa minifloat. ``max`` is the largest finite value."""
    name: str
    ebits: int
    mbits: int
    max: float
    has_inf: bool
    has_nan: bool

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def bias(self) -> int:
        return 2 ** (self.ebits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest normal number (the MX spec's emax_elem)."""
        return math.floor(math.log2(self.max))


@dataclass(frozen=True)
class IntSpec:
    """A two's-complement integer grid, ``step`` apart (MXINT8 elements have step 2**-6)."""
    name: str
    bits: int
    step: float = 1.0

    @property
    def qmax(self) -> int:
        # Symmetric range [-qmax, qmax]: the code -2**(bits-1) is unused, so 0 is exact and
        # negation is exact (the MX spec allows -2 for MXINT8; implementations clamp to it too).
        return 2 ** (self.bits - 1) - 1

    @property
    def max(self) -> float:
        return self.qmax * self.step

    @property
    def emax(self) -> int:
        return math.floor(math.log2(self.max))


ElementSpec = Union[FloatSpec, IntSpec]


@dataclass(frozen=True)
class BlockSpec:
    """Block-scaled: ``block`` consecutive elements share one scale of type ``scale``.

    ``e8m0`` scales are powers of two (OCP MX v1.0); ``e4m3`` scales are fp8 numbers under
    an fp32 per-tensor scale (NVFP4).
    """
    name: str
    element: ElementSpec
    block: int
    scale: str

    @property
    def bits(self) -> int:
        return self.element.bits


Format = Union[FloatSpec, IntSpec, BlockSpec]

FP8_E4M3 = FloatSpec("fp8_e4m3", 4, 3, 448.0, has_inf=False, has_nan=True)    # OCP E4M3FN
FP8_E5M2 = FloatSpec("fp8_e5m2", 5, 2, 57344.0, has_inf=True, has_nan=True)
FP6_E2M3 = FloatSpec("fp6_e2m3", 2, 3, 7.5, has_inf=False, has_nan=False)
FP6_E3M2 = FloatSpec("fp6_e3m2", 3, 2, 28.0, has_inf=False, has_nan=False)
FP4_E2M1 = FloatSpec("fp4_e2m1", 2, 1, 6.0, has_inf=False, has_nan=False)
INT8, INT4, INT3 = IntSpec("int8", 8), IntSpec("int4", 4), IntSpec("int3", 3)

FORMATS: dict[str, Format] = {f.name: f for f in (
    FP8_E4M3, FP8_E5M2, FP6_E2M3, FP6_E3M2, FP4_E2M1, INT8, INT4, INT3,
    BlockSpec("mxfp8_e4m3", FP8_E4M3, 32, "e8m0"),
    BlockSpec("mxfp8_e5m2", FP8_E5M2, 32, "e8m0"),
    BlockSpec("mxfp6_e2m3", FP6_E2M3, 32, "e8m0"),
    BlockSpec("mxfp6_e3m2", FP6_E3M2, 32, "e8m0"),
    BlockSpec("mxfp4", FP4_E2M1, 32, "e8m0"),
    BlockSpec("mxint8", IntSpec("int8", 8, step=2.0 ** -6), 32, "e8m0"),
    BlockSpec("nvfp4", FP4_E2M1, 16, "e4m3"),
)}

GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_block")
GROUP_SIZES = (16, 32, 64, 128, 256, 512)
ROUNDINGS = ("nearest", "stochastic")
OVERFLOWS = ("saturate", "nan")
# absmax: scale = max|x| / max; mse: the clipping ratio with the least squared error;
# none: no scale, a plain cast. floor/ceil/even/rceil: the MX shared-exponent rules.
ELEMENT_SCALE_RULES = ("absmax", "mse", "none")
MX_SCALE_RULES = ("floor", "ceil", "even", "rceil")
SCALE_RULES = ELEMENT_SCALE_RULES + MX_SCALE_RULES
KERNELS = ("torch", "triton", "torchao")


class KnobError(ValueError):
    """A format or knob value that does not exist or does not fit the format."""

    def __init__(self, key: str, value, allowed: tuple):
        self.key, self.value, self.allowed = key, value, tuple(allowed)
        super().__init__(f"{key}={value}: not allowed here; allowed: {', '.join(map(str, allowed))}")


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise KnobError("format", name, tuple(FORMATS))
    return FORMATS[name]


def check_knobs(fmt: str, granularity: str = "per_channel", group_size: int = 128, rounding: str = "nearest",
                scale_rule: Optional[str] = None, overflow: str = "saturate", symmetric: bool = True) -> Format:
    """The format's spec if every knob exists and fits it; else :class:`KnobError`."""
    spec = get_format(fmt)
    block = isinstance(spec, BlockSpec)
    for key, value, allowed in (("granularity", granularity, GRANULARITIES), ("rounding", rounding, ROUNDINGS),
                                ("overflow", overflow, OVERFLOWS)):
        if value not in allowed:
            raise KnobError(key, value, allowed)
    if block != (granularity == "per_block"):
        raise KnobError("granularity", granularity, ("per_block",) if block else GRANULARITIES[:3])
    if granularity == "per_group" and group_size not in GROUP_SIZES:
        raise KnobError("group_size", group_size, GROUP_SIZES)
    rules = default_scale_rules(spec)
    if scale_rule is not None and scale_rule not in rules:
        raise KnobError("scale_rule", scale_rule, rules)
    element = spec.element if block else spec
    # Integers, fp6 and fp4 encode no NaN or Inf; a clipping ratio below 1 must saturate.
    if overflow == "nan" and (isinstance(element, IntSpec) or not (element.has_nan or element.has_inf)
                              or scale_rule == "mse"):
        raise KnobError("overflow", overflow, ("saturate",))
    if not symmetric and not isinstance(spec, IntSpec):
        raise KnobError("symmetric", symmetric, (True,))  # zero points are for int formats only
    return spec


PACKING = {8: (1, 1), 6: (4, 3), 4: (2, 1), 3: (8, 3)}  # code bits -> (codes, bytes) per packing unit


def storage_bytes(fmt: str, shape: tuple[int, ...], granularity: Optional[str] = None, group_size: int = 128,
                  symmetric: bool = True) -> int:
    """Bytes a tensor of ``shape`` takes in the format, as ``kernels.formats`` stores it: packed codes, one
    scale per block (fp32 for element formats, one byte for MX and NVFP4, plus NVFP4's fp32 tensor
    scale) and, when asymmetric, a one-byte zero point per block. Torch-free, for the cost model."""
    spec = get_format(fmt)
    numel = math.prod(shape)
    if isinstance(spec, BlockSpec):
        block = spec.block
    else:
        block = {"per_tensor": numel, "per_channel": shape[-1]}.get(granularity or "per_channel", group_size)
    per_unit, unit_bytes = PACKING[spec.bits]
    blocks = numel // block
    scale_bytes = (1 if isinstance(spec, BlockSpec) else 4) * blocks
    tensor_scale = 4 if isinstance(spec, BlockSpec) and spec.scale == "e4m3" else 0
    return -(-numel // per_unit) * unit_bytes + scale_bytes + tensor_scale + (0 if symmetric else blocks)


def default_scale_rules(spec: Format) -> tuple[str, ...]:
    """The scale rules a format allows, the default first."""
    if isinstance(spec, BlockSpec):
        return MX_SCALE_RULES if spec.scale == "e8m0" else ("absmax",)
    if isinstance(spec, IntSpec):
        return ("absmax", "mse")
    return ELEMENT_SCALE_RULES


class Unsupported(Exception):
    """This hardware or software cannot run this cell (no GPU, too old a GPU, a missing
    package, a format a kernel does not take); reported as UNSUPPORTED, not as a crash."""


def is_plain_fp8_per_token(knobs: dict) -> bool:
    """Activation knobs that are plain fp8_e4m3 per token (absmax, nearest, saturate): what the
    fp8 W8A8 kernels (ours and torchao's) compute."""
    return (knobs["fmt"] == "fp8_e4m3" and knobs["granularity"] == "per_channel" and knobs["rounding"] == "nearest"
            and knobs.get("scale_rule") in (None, "absmax") and knobs["overflow"] == "saturate"
            and "scales" not in knobs)


def is_plain_fp8_static(knobs: dict) -> bool:
    """Activation knobs that are fp8_e4m3 under one static scale (nearest, saturate): what our fp8
    W8A8 kernel computes with a calibrated scale."""
    return (knobs["fmt"] == "fp8_e4m3" and knobs["granularity"] == "per_tensor" and "scales" in knobs
            and knobs["rounding"] == "nearest" and knobs["overflow"] == "saturate")
