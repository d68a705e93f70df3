"""MX quantization against an exact reference written from the OCP MX v1.0 spec text
(``tests/kernels/mx_reference.py``), bit for bit, over a million values per format and scale rule
that reach every edge: ties, element subnormals, zero blocks, tiny and huge blocks, NaN and Inf."""

import math

import pytest
import torch

from kernels import formats
from tests.kernels import mx_reference
from tests.kernels.conftest import same_values

RULES = ["floor", "ceil", "even", "rceil"]
BLOCKS = 2 ** 15  # x 32 = 1,048,576 values
FLT_MAX = torch.finfo(torch.float32).max


def _up(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, math.inf))


def _down(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, -math.inf))


def edge_blocks(fmt: str, n_blocks: int = BLOCKS, seed: int = 0) -> torch.Tensor:
    """fp32 [n_blocks, 32]: a mix of block kinds, each kind an equal share, rows shuffled."""
    element = mx_reference.ELEMENTS[fmt]
    grid = element.magnitudes()
    gen = torch.Generator().manual_seed(seed)
    kinds = 10
    n = n_blocks // kinds + 1

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def randint(lo, hi, *shape):
        return torch.randint(lo, hi, shape, generator=gen)

    def signs(*shape):
        return torch.where(torch.rand(*shape, generator=gen) < 0.5, -1.0, 1.0).double()

    def pinned(shared):  # a block whose floor-rule scale is 2**shared: element 0 is max_elem * X
        x = torch.zeros(n, 32, dtype=torch.float64)
        x[:, 0] = element.max
        return x, mx_reference.pow2(shared)[:, None]

    parts = [
        randn(n, 32),                                                   # N(0, 1)
        randn(n, 32) * mx_reference.pow2(randint(-20, 21, n, 1)),       # wide range per block
        randn(n, 32) * mx_reference.pow2(randint(-20, 21, n, 32)),      # and per element
    ]
    # Exact ties between neighbours of the element grid (subnormals included) and their +-1 ulp
    # neighbours, under a scale the block's max pins.
    x, scale = pinned(randint(-100, 101, n))
    i = randint(0, len(grid) - 1, n, 31)
    ties = ((grid[i] + grid[i + 1]) / 2 * signs(n, 31) * scale).float()
    nudge = randint(0, 3, n, 31)
    ties = torch.where(nudge == 1, _up(ties), torch.where(nudge == 2, _down(ties), ties))
    parts.append(torch.cat([(x[:, :1] * scale).float(), ties], dim=1).double())
    # The grid itself (subnormals of the element, and its max) and values past the max that
    # the floor rule leaves below 2**(emax + 1): they saturate.
    x, scale = pinned(randint(-100, 101, n))
    x[:, 1:16] = grid[randint(0, len(grid), n, 15)] * signs(n, 15)
    x[:, 16:] = element.max + torch.rand(n, 16, generator=gen, dtype=torch.float64) * (
        2.0 ** (element.emax + 1) - element.max)
    parts.append(x * scale)
    # Zero blocks: +0, -0, mixed; and a lone nonzero among zeros.
    zeros = torch.zeros(n, 32, dtype=torch.float64) * signs(n, 32)
    zeros[n // 2:, 0] = randn(n - n // 2)
    parts.append(zeros)
    # max|x| exactly 2**k, or one fp32 ulp either side, for k over fp32's whole range.
    k = randint(-149, 128, n)
    top = mx_reference.pow2(k).float()
    nudge = randint(0, 3, n)
    top = torch.where(nudge == 1, _up(top), torch.where(nudge == 2, _down(top), top))
    x = (torch.rand(n, 32, generator=gen, dtype=torch.float64) * top.double()[:, None]).float().double()
    x[:, 0] = top.double()
    parts.append(x * signs(n, 32))
    # Near FLT_MAX.
    parts.append(torch.rand(n, 32, generator=gen, dtype=torch.float64) * FLT_MAX * signs(n, 32)
                 + torch.where(randint(0, 2, n, 1) == 1, FLT_MAX, 0.0))
    # Tiny blocks: max|x| from 2**-149 to 2**-100 (fp32 subnormals and the smallest normals).
    parts.append(randn(n, 32) * mx_reference.pow2(randint(-149, -99, n, 1)))
    parts.append(randint(-3, 4, n, 32).double() * 2.0 ** -149)         # the smallest subnormals
    x = torch.cat(parts)[: n_blocks].clamp(-FLT_MAX, FLT_MAX).float()
    return x[torch.randperm(len(x), generator=gen)]


@pytest.fixture(scope="module")
def blocks():
    return {fmt: edge_blocks(fmt) for fmt in mx_reference.ELEMENTS}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fmt", list(mx_reference.ELEMENTS))
def test_mx_matches_the_exact_reference_bit_for_bit(fmt, rule, blocks, device):
    x = blocks[fmt]
    ref_scales, ref_codes, ref_values = mx_reference.quantize(x, fmt, rule)
    ours = formats.quantize(x.to(device), fmt, scale_rule=rule)
    scales, codes = ours.scales.cpu(), ours.element_codes().cpu()
    bad = (scales != ref_scales) | (codes != ref_codes).any(dim=1)
    assert not bad.any(), (f"{int(bad.sum())} of {len(x)} blocks differ; first: {x[bad][0].tolist()}: scale "
                           f"{scales[bad][0].item()} vs {ref_scales[bad][0].item()}, codes {codes[bad][0].tolist()} "
                           f"vs {ref_codes[bad][0].tolist()}")
    assert same_values(ours.dequantize().cpu(), ref_values)


def test_the_issue_example_keeps_its_value():
    """A block whose shared exponent reaches -127 is scaled by 2**-127, as E8M0's byte 0 decodes."""
    x = torch.zeros(1, 32)
    x[0, 0] = 1.5 * 2.0 ** -119
    q = formats.quantize(x, "mxfp8_e4m3", scale_rule="floor")
    assert q.scales.tolist() == [0] and q.element_codes()[0, 0].item() == 0x7C  # 384 = 1.5 * 2**8
    assert q.dequantize()[0, 0].item() == 1.5 * 2.0 ** -119


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fmt", list(mx_reference.ELEMENTS))
def test_a_block_holding_nan_or_inf_is_a_nan_block_and_only_that_block(fmt, rule, device):
    x = torch.randn(4, 32)
    x[0, 3], x[1, 7], x[2, 0] = math.inf, -math.inf, math.nan
    q = formats.quantize(x.to(device), fmt, scale_rule=rule)
    assert q.scales.tolist() == [255, 255, 255, q.scales[3].item()] and q.scales[3] != 255
    assert (q.element_codes()[:3] == 0).all()
    values = q.dequantize().cpu()
    assert values[:3].isnan().all() and values[3].isfinite().all()
    assert same_values(values[3:], formats.quantize(x[3:].to(device), fmt, scale_rule=rule).dequantize().cpu())


def test_the_reference_is_its_own_oracle_on_hand_checked_blocks():
    """The reference itself, on values worked out by hand from the spec."""
    x = torch.zeros(3, 32)
    x[0, :3] = torch.tensor([6.0, 5.0, -0.75])  # mxfp4 floor: amax 6 -> 2**(2 - 2) = 1; ties to even codes
    x[1, 0] = 2.0 ** -149                       # smallest subnormal: scale 2**-127, element 2**-22 -> 0
    x[2, :2] = torch.tensor([-0.0, 1e-3])
    scales, codes, values = mx_reference.quantize(x, "mxfp4", "floor")
    assert scales.tolist() == [127, 0, 115]     # row 2: floor(log2 1e-3) = -10; -10 - 2 + 127
    assert values[0, :3].tolist() == [6.0, 4.0, -1.0] and codes[0, 2].item() == 0b1010  # 4 = 0b110, 1 = 0b010
    assert values[1, 0].item() == 0.0 and codes[2, 0].item() == 0b1000  # -0 keeps its sign
    assert mx_reference.quantize(x, "mxint8", "floor")[1][2, 0].item() == 0  # no -0 in MXINT8
