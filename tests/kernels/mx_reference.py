"""An exact reference for MX quantization, written from the OCP MX v1.0 spec text (sections 5
and 6.3) and independent of ``kernels.formats``: float64 arithmetic, powers of two built from
their bits, every element grid enumerated from its bit layout, round to nearest with ties to
the even code. Used only by the tests.

Per block of 32 values V_i (spec, section 6.3, "shared scale"):

- ``floor`` (the spec's rule): X = 2^(floor(log2(max|V_i|)) - emax_elem);
- ``ceil``: X = 2^(ceil(log2(max|V_i|)) - emax_elem);
- ``even``: max|V_i| first rounded to the element's mantissa width (ties away from zero, as
  torchao's EVEN mode does), then as ``floor``;
- ``rceil`` (cuBLAS, Blackwell): X = 2^ceil(log2(d)) with d = max|V_i| / max_elem rounded to
  the nearest fp32, as the hardware and torchao compute it;

with the exponent clamped to E8M0's range [-127, 127] (a zero block takes 2^-127), and the
byte 0xFF (NaN) for a block holding NaN or +-Inf (E8M0 has no Inf; microxcaling does the same).
Then P_i = the element nearest to V_i / X, saturated at +-max_elem (section 6.3: "clamped to the
maximum normal"); zeros keep their sign in the float elements and MXINT8 has no -0. A NaN
block's element codes are 0: its values are NaN whatever they hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Element:
    """An MX element type as the spec's table 1-4 define it."""
    ebits: int          # 0 for MXINT8
    mbits: int          # fraction bits (MXINT8: 6, the implicit 2^-6)
    bias: int
    emax: int           # emax_elem: the exponent of the largest normal
    max: float
    bits: int
    reserved: tuple = ()  # magnitude codes that are not finite numbers (NaN, Inf)

    def magnitudes(self) -> torch.Tensor:
        """float64 value of every non-negative finite magnitude code, indexed by code."""
        values = []
        for code in range(2 ** (self.bits - 1)):
            if not self.ebits:
                values.append(code * 2.0 ** -self.mbits)
                continue
            exp, frac = code >> self.mbits, code & (2 ** self.mbits - 1)
            if exp == 0:  # subnormal: 0.frac * 2^(1 - bias)
                values.append(frac * 2.0 ** (1 - self.bias - self.mbits))
            else:
                values.append((1 + frac * 2.0 ** -self.mbits) * 2.0 ** (exp - self.bias))
        table = torch.tensor(values, dtype=torch.float64)
        finite = [c for c in range(len(values)) if c not in self.reserved]
        assert finite == list(range(len(finite))) and table[finite[-1]] == self.max  # codes ascend to max
        return table[: len(finite)]


ELEMENTS = {
    "mxfp8_e4m3": Element(4, 3, 7, 8, 448.0, 8, reserved=(0x7F,)),
    "mxfp8_e5m2": Element(5, 2, 15, 15, 57344.0, 8, reserved=tuple(range(0x7C, 0x80))),
    "mxfp6_e3m2": Element(3, 2, 3, 4, 28.0, 6),
    "mxfp6_e2m3": Element(2, 3, 1, 2, 7.5, 6),
    "mxfp4": Element(2, 1, 1, 2, 6.0, 4),
    "mxint8": Element(0, 6, 0, 0, 127 / 64, 8),
}


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2.0 ** exponent (integers in float64's normal range), built from the exponent bits."""
    return ((exponent.to(torch.int64) + 1023) << 52).view(torch.float64)


def shared_exponent(amax: torch.Tensor, element: Element, rule: str) -> torch.Tensor:
    """The unbiased shared exponent of each block, clamped to E8M0's [-127, 127]; amax float64 >= 0."""
    if rule == "rceil":
        amax = (amax / element.max).float().double()  # the fp32 descale the hardware rounds up
    mant, exp = torch.frexp(amax)  # amax = mant * 2^exp, mant in [0.5, 1)
    floor_log2 = exp.to(torch.int64) - 1
    if rule == "floor":
        e = floor_log2 - element.emax
    elif rule == "ceil":
        e = floor_log2 + (mant != 0.5) - element.emax
    elif rule == "even":  # rounding to mbits fraction bits carries into the next binade
        e = floor_log2 + (mant >= 1 - 2.0 ** -(element.mbits + 2)) - element.emax
    elif rule == "rceil":
        e = floor_log2 + (mant != 0.5)
    else:
        raise ValueError(rule)
    return torch.where(amax > 0, e, -127).clamp(-127, 127)


def round_to_element(v: torch.Tensor, element: Element) -> torch.Tensor:
    """Codes (uint8) of float64 ``v`` rounded to the nearest element, ties to the even code,
    saturating at +-max."""
    table = element.magnitudes()
    a = v.abs()
    hi = torch.searchsorted(table, a).clamp(max=len(table) - 1)  # first value >= a (or the top)
    lo = (hi - 1).clamp(min=0)
    mid = (table[lo] + table[hi]) / 2  # exact in float64
    pick_hi = (a > mid) | ((a == mid) & (hi % 2 == 0))
    magnitude = torch.where(a >= table[-1], len(table) - 1, torch.where(pick_hi, hi, lo))
    negative = torch.signbit(v)
    if not element.ebits:  # two's complement, no -0
        return torch.where(negative, -magnitude, magnitude).bitwise_and(0xFF).to(torch.uint8)
    return (magnitude | (negative.to(torch.int64) << (element.bits - 1))).to(torch.uint8)


def decode(codes: torch.Tensor, element: Element) -> torch.Tensor:
    """float64 value of each element code."""
    table = element.magnitudes()
    c = codes.to(torch.int64)
    if not element.ebits:
        return torch.where(c >= 128, c - 256, c).double() * 2.0 ** -element.mbits
    sign = torch.where((c >> (element.bits - 1)) == 1, -1.0, 1.0).double()
    return sign * table[c & (2 ** (element.bits - 1) - 1)]


def quantize(x: torch.Tensor, fmt: str, rule: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E8M0 bytes [blocks], element codes [blocks, 32], dequantized fp32 [blocks, 32]) of fp32 ``x``
    [blocks, 32]."""
    element = ELEMENTS[fmt]
    v = x.double()
    amax = v.abs().amax(dim=1)
    special = ~torch.isfinite(v).all(dim=1)
    e = shared_exponent(torch.where(special, 0.0, amax), element, rule)
    scale_bytes = torch.where(special, 255, e + 127).to(torch.uint8)
    scale = pow2(e)
    codes = round_to_element(v / scale[:, None], element)
    codes = torch.where(special[:, None], 0, codes).to(torch.uint8)
    values = (decode(codes, element) * scale[:, None]).float()
    return scale_bytes, codes, torch.where(special[:, None], float("nan"), values)
