"""The numerics against references nobody here wrote: torch's native dtypes and torchao."""

import math

import pytest
import torch

from kernels import catalog, formats, metrics, packing, registry
from kernels.catalog import FORMATS, KnobError
from tests.kernels.conftest import bits_equal, edge_values, same_values

NATIVE = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
MX_ELEMENTS = {"mxfp8_e4m3": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2,
               "mxfp6_e2m3": "fp6_e2m3", "mxfp6_e3m2": "fp6_e3m2", "mxfp4": torch.float4_e2m1fn_x2}


def torch_overflow_mode(dtype: torch.dtype, device: str) -> str:
    """How this torch build casts finite overflow to ``dtype``: saturating or not."""
    return "saturate" if torch.tensor([1e9], device=device).to(dtype).float().isfinite().item() else "nan"


# --------------------------------------------------------------------------- every code decodes

@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_every_fp8_code_decodes_as_torch(fmt):
    codes = torch.arange(256, dtype=torch.uint8)
    assert same_values(formats.value_table(FORMATS[fmt]), codes.view(NATIVE[fmt]).float())


def test_every_e8m0_code_decodes_as_torch():
    codes = torch.arange(256, dtype=torch.uint8)
    q = formats.QuantizedTensor(codes=torch.zeros(256 * 32, dtype=torch.uint8), scales=codes,
                                spec=FORMATS["mxfp8_e4m3"], shape=torch.Size([256, 32]), block=32)
    assert same_values(q.scale_values(), codes.view(torch.float8_e8m0fnu).float())


@pytest.mark.parametrize("fmt,decoder", [("fp4_e2m1", "f4_unpacked_to_f32"), ("fp6_e2m3", "f6_e2m3_unpacked_to_f32"),
                                         ("fp6_e3m2", "f6_e3m2_unpacked_to_f32")])
def test_every_fp4_and_fp6_code_decodes_as_torchao(fmt, decoder):
    # torch 2.13 cannot convert float4_e2m1fn_x2 to float ("copy_kernel" not implemented).
    kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")
    spec = FORMATS[fmt]
    codes = torch.arange(2 ** spec.bits, dtype=torch.uint8)
    assert bits_equal(formats.value_table(spec), getattr(kernels, decoder)(codes))


# --------------------------------------------------------------------------- casts, bit for bit

@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_casts_match_torch_bit_for_bit(fmt, src, device):
    x = edge_values(20000, seed=0).to(src).to(device)
    mode = torch_overflow_mode(NATIVE[fmt], device)
    q = formats.quantize(x, fmt, granularity="per_tensor", scale_rule="none", overflow=mode)
    assert torch.equal(q.element_codes(), x.to(NATIVE[fmt]).view(torch.uint8))
    assert same_values(formats.cast(x, fmt, overflow=mode), x.to(NATIVE[fmt]).float())


@pytest.mark.parametrize("fmt,encoder", [("fp4_e2m1", "f32_to_f4_unpacked"), ("fp6_e2m3", "f32_to_f6_e2m3_unpacked"),
                                         ("fp6_e3m2", "f32_to_f6_e3m2_unpacked")])
def test_fp4_and_fp6_casts_match_torchao_bit_for_bit(fmt, encoder, device):
    kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")
    x = edge_values(20000, seed=1, spread=(-12, 6))
    x = x[~torch.isnan(x)].to(device)  # no NaN encoding; torchao returns an arbitrary code for it
    q = formats.quantize(x, fmt, granularity="per_tensor", scale_rule="none")
    assert torch.equal(q.element_codes(), getattr(kernels, encoder)(x.float()))


def test_saturate_and_nan_overflow_modes():
    x = torch.tensor([447.0, 464.0, 465.0, 1e6, float("inf"), -float("inf"), float("nan")])
    sat = formats.cast(x, "fp8_e4m3", overflow="saturate")
    assert sat[:6].tolist() == [448.0, 448.0, 448.0, 448.0, 448.0, -448.0] and sat[6].isnan()
    nan = formats.cast(x, "fp8_e4m3", overflow="nan")  # 464 is a tie: to 448 (even), not 480 (NaN)
    assert nan[:2].tolist() == [448.0, 448.0] and nan[2:].isnan().all()
    e5m2 = formats.cast(torch.tensor([61439.0, 61440.0, 1e6]), "fp8_e5m2", overflow="nan")
    assert e5m2.tolist() == [57344.0, float("inf"), float("inf")]


# --------------------------------------------------------------------------- MX and NVFP4 vs torchao

def _mx_input(device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 256, generator=gen) * torch.exp2(torch.randint(-8, 8, (64, 1), generator=gen).float())
    x[0, :32] = 0.0                    # all-zero block
    x[1, 32:64] = 1e30                 # huge
    x[2, :32] = 2.0 ** -140            # tiny (fp32 subnormal)
    x[3, 5] = float("nan")             # NaN block
    x[4, :32] = torch.tensor([2.0 ** k for k in range(-16, 16)])  # exact powers of two
    x[5, :] = edge_values(64, seed)[:256].repeat(4)[:256].nan_to_num(nan=1.0, posinf=3.0, neginf=-3.0)
    return x.to(device)


@pytest.mark.parametrize("fmt", list(MX_ELEMENTS))
@pytest.mark.parametrize("rule", ["floor", "rceil", "ceil", "even"])
def test_mx_matches_torchao_to_mx_bit_for_bit_where_torchao_follows_the_spec(fmt, rule, device):
    """torchao 0.18 departs from OCP MX v1.0 on blocks whose scale byte is 0 (it divides by
    2**-126, or multiplies by 1.0 under RCEIL, but decodes 2**-127) and on blocks holding Inf
    (a finite scale, not NaN): docs/design.md. Everywhere else it is the second reference."""
    mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    from torchao.prototype.mx_formats import constants
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    elem = MX_ELEMENTS[fmt]
    elem = getattr(constants, f"DTYPE_{elem.upper()}") if isinstance(elem, str) else elem
    x = _mx_input(device, seed=hash(fmt) % 1000)
    ref = mx_tensor.MXTensor.to_mx(x, elem, 32, scaling_mode=ScaleCalculationMode(rule))
    ours = formats.quantize(x, fmt, scale_rule=rule)

    scales = ours.scales.view(64, 8)
    spec_blocks = (scales != 0) & ~torch.isinf(x).view(64, 8, 32).any(dim=2)
    assert spec_blocks.sum() >= 64 * 8 - 4  # the tiny block and the zero block of _mx_input
    assert torch.equal(scales[spec_blocks], ref.scale.view(torch.uint8)[spec_blocks])
    ref_codes = ref.qdata.view(torch.uint8)
    finite_blocks = (spec_blocks & (scales != 255)).repeat_interleave(32, dim=1)
    if fmt == "mxfp4":
        ref_codes = packing.unpack(ref_codes.reshape(-1), 4, x.numel()).view(64, 256)
    assert torch.equal(ours.element_codes()[finite_blocks], ref_codes[finite_blocks])
    in_spec = spec_blocks.repeat_interleave(32, dim=1)
    assert same_values(ours.dequantize()[in_spec], ref.dequantize(torch.float32)[in_spec])


def test_mxint8_follows_the_ocp_definition():
    x = torch.tensor([[1.0, -0.5, 0.75, 1.984375, 3e-3] + [0.0] * 27])
    q = formats.quantize(x, "mxint8")
    assert q.scales.tolist() == [127]  # amax 1.98 -> 2**(0 - emax_elem 0)
    assert formats.value_table(q.element)[q.element_codes().long()][0, :5].tolist() == [1.0, -0.5, 0.75, 1.984375, 0.0]
    big = formats.quantize(x * 96, "mxint8")  # amax 190.5: 2**(7 - 0); 96 / 128 = 0.75 exactly
    assert big.scales.tolist() == [134] and big.dequantize()[0, 0] == 96.0


def test_nvfp4_matches_torchao_bit_for_bit(device):
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    x = _mx_input(device, seed=7)
    x = torch.where(torch.isnan(x), 1.0, x)
    x[1, 32:64] = 1e4  # huge relative to the rest, not beyond fp32 range of the scales
    ref = nv.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=nv.per_tensor_amax_to_scale(x.abs().amax()))
    ours = formats.quantize(x, "nvfp4")
    assert torch.equal(ours.scales.view(64, 16), ref.scale.view(torch.uint8))
    assert torch.equal(ours.codes.view(64, 128), ref.qdata.view(torch.uint8))
    assert bits_equal(ours.dequantize(), ref.dequantize(torch.float32))


def test_nvfp4_all_zero_tensor_is_zero_not_nan():
    assert torch.equal(formats.fake_quant(torch.zeros(2, 32), "nvfp4"), torch.zeros(2, 32))


def _nvfp4_error_bound(q: formats.QuantizedTensor) -> torch.Tensor:
    """Per element: half the widest E2M1 step (1.0) times the block's decoded scale, plus the
    fp32 rounding of the scaled value and of the product."""
    scale = q.scale_values().repeat_interleave(q.block).view(q.shape)
    return scale * (1 + 2.0 ** -20) + 2.0 ** -149


@pytest.mark.parametrize("k", [-149, -140, -133, -129, -125, -121, -115, -110, -100, 0, 100, 127])
def test_nvfp4_of_tiny_and_huge_tensors_is_finite_and_within_its_step(k, device):
    fmax = torch.finfo(torch.float32).max
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(k + 200)) * 2.0 ** k).clamp(-fmax, fmax)
    x[0, 0] = fmax if k == 127 else 2.0 ** k  # amax near 2**k even where the randn product underflows
    x = x.to(device)
    q = formats.quantize(x, "nvfp4")
    values = q.dequantize()
    assert values.isfinite().all() and q.tensor_scale.item() >= formats.NVFP4_MIN_TENSOR_SCALE
    assert ((values - x).abs() <= _nvfp4_error_bound(q)).all()
    assert torch.equal(torch.signbit(values), torch.signbit(x))  # what flushes keeps its sign
    if k >= -129:  # down to 2**-129 something survives: 0.5 * 2**-6 * 2**-121 = 2**-128
        assert (values != 0).any()


def test_nvfp4_block_scales_stop_at_e4m3s_smallest_normal_and_decode_as_they_quantize(device):
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(5)).to(device)
    x[1, 16:32] *= 1e-7  # ideal scale ~ 448e-7 / ..., deep in E4M3's subnormals
    q = formats.quantize(x, "nvfp4")
    assert q.scales.view(2, 4)[1, 1].item() == 0x08  # 2**-6, E4M3's smallest normal, as torchao clamps
    values = q.dequantize()
    assert ((values - x).abs() <= _nvfp4_error_bound(q)).all()
    decoded = formats.value_table(q.element).to(device)[q.element_codes().long()] * q.scale_values().repeat_interleave(16).view(2, 64)
    assert torch.equal(values, decoded)


def test_nvfp4_nan_or_inf_makes_its_block_nan_and_leaves_the_tensor_scale_to_the_rest(device):
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(6)).to(device)
    poisoned = x.clone()
    poisoned[0, 3], poisoned[1, 20], poisoned[2, 0] = math.inf, -math.inf, math.nan
    q, clean = formats.quantize(poisoned, "nvfp4"), formats.quantize(torch.where(poisoned.isfinite(), poisoned, 0), "nvfp4")
    assert q.tensor_scale.isfinite().all() and torch.equal(q.tensor_scale, clean.tensor_scale)
    special = torch.tensor([[True, False], [False, True], [True, False], [False, False]], device=device).view(-1)
    assert (q.scales[special] == 0x7F).all() and torch.equal(q.scales[~special], clean.scales[~special])
    codes = q.element_codes().view(8, 16)
    assert (codes[special] == 0).all() and torch.equal(codes[~special], clean.element_codes().view(8, 16)[~special])
    assert q.dequantize().view(8, 16)[special].isnan().all()
    assert q.dequantize().view(8, 16)[~special].isfinite().all()


# --------------------------------------------------------------------------- storage and round trips

@pytest.mark.parametrize("width", [3, 4, 6, 8])
def test_packing_round_trips_every_code(width, device):
    codes = torch.randint(0, 2 ** width, (96, 64), dtype=torch.uint8, device=device)
    packed = packing.pack(codes, width)
    assert packed.numel() == codes.numel() * width // 8
    assert torch.equal(packing.unpack(packed, width, codes.numel()).view(96, 64), codes)


ALL_CASES = [("int8", {}), ("int4", {"granularity": "per_group", "group_size": 32}),
             ("int3", {"granularity": "per_group", "group_size": 64}),
             ("int4", {"granularity": "per_group", "group_size": 128, "symmetric": False}),
             ("int8", {"granularity": "per_tensor", "scale_rule": "mse"}),
             ("fp8_e4m3", {"granularity": "per_tensor"}), ("fp8_e5m2", {}), ("fp6_e2m3", {}),
             ("fp6_e3m2", {"granularity": "per_group", "group_size": 64}), ("fp4_e2m1", {"scale_rule": "mse"}),
             ("mxfp8_e4m3", {}), ("mxfp8_e5m2", {"scale_rule": "rceil"}), ("mxfp6_e2m3", {}), ("mxfp6_e3m2", {}),
             ("mxfp4", {"rounding": "stochastic", "seed": 3}), ("mxint8", {"scale_rule": "ceil"}), ("nvfp4", {})]


@pytest.mark.parametrize("fmt,knobs", ALL_CASES, ids=[f"{f}-{k}" for f, k in ALL_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_is_exactly_fake_quant(fmt, knobs, dtype, device):
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)
    q = formats.quantize(x, fmt, **knobs)
    fq = formats.fake_quant(x, fmt, **knobs)
    assert fq.dtype == dtype and fq.shape == x.shape and fq.device == x.device
    assert torch.equal(q.dequantize(dtype), fq)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == x.numel() * q.element.bits // 8


@pytest.mark.parametrize("fmt,bits", [("int4", 4 + 32 / 128), ("int8", 8 + 32 / 256), ("fp6_e2m3", 6 + 32 / 256),
                                      ("mxfp4", 4.25), ("mxfp6_e3m2", 6.25), ("mxfp8_e4m3", 8.25),
                                      ("nvfp4", 4.5 + 32 / (32 * 256))])
def test_bits_per_element_count_codes_and_scales(fmt, bits):
    knobs = {"granularity": "per_group", "group_size": 128} if fmt == "int4" else {}
    assert formats.quantize(torch.randn(32, 256), fmt, **knobs).bits_per_element == pytest.approx(bits)


def test_int8_per_channel_codes_and_scales_are_exact():
    w = torch.tensor([[-1.0, 0.5, 1.0, 0.25], [0.0, 0.0, 0.0, 0.0]])
    q = formats.quantize(w, "int8", granularity="per_channel")
    assert torch.equal(q.scales, torch.tensor([1.0 / 127, 1.0]))  # an all-zero row gets scale 1
    # 0.5 * 127 = 63.5 and 0.25 * 127 = 31.75: round half to even gives 64, 32.
    assert formats.value_table(q.element)[q.element_codes().long()].tolist() == [[-127, 64, 127, 32], [0, 0, 0, 0]]


def test_asymmetric_int4_keeps_zero_exact_and_beats_symmetric_on_one_sided_data():
    x = torch.rand(64, 128, generator=torch.Generator().manual_seed(0))
    x[:, 0] = 0.0
    asym = formats.fake_quant(x, "int4", granularity="per_group", group_size=128, symmetric=False)
    sym = formats.fake_quant(x, "int4", granularity="per_group", group_size=128)
    assert torch.equal(asym[:, 0], torch.zeros(64))
    assert metrics.sqnr_db(x, asym) > metrics.sqnr_db(x, sym) + 4


def test_mse_clipping_is_never_worse_than_absmax_and_helps_int4():
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    for fmt, gain in (("int4", 0.5), ("fp4_e2m1", 0.2), ("int8", 0.0)):
        absmax = metrics.sqnr_db(x, formats.fake_quant(x, fmt))
        mse = metrics.sqnr_db(x, formats.fake_quant(x, fmt, scale_rule="mse"))
        assert mse >= absmax + gain, fmt  # measured: int4 18.4 -> 19.3 dB, fp4 19.2 -> 19.6 dB


def test_stochastic_rounding_is_seeded_unbiased_and_lands_on_a_neighbour():
    x = torch.full((200_000,), 0.3)  # between fp4 grid points 0.25... scaled: use a plain cast
    a = formats.cast(x, "fp4_e2m1", rounding="stochastic", seed=1)
    assert torch.equal(a, formats.cast(x, "fp4_e2m1", rounding="stochastic", seed=1))
    assert not torch.equal(a, formats.cast(x, "fp4_e2m1", rounding="stochastic", seed=2))
    assert set(a.unique().tolist()) == {0.0, 0.5}
    assert a.mean().item() == pytest.approx(0.3, abs=0.005)


# --------------------------------------------------------------------------- metrics and errors

def test_sqnr_orders_formats_by_bits():
    x = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    s = {f: metrics.sqnr_db(x, formats.fake_quant(x, f)) for f in ("int8", "fp8_e4m3", "mxfp6_e3m2", "mxfp4", "nvfp4")}
    # Measured on N(0, 1): 43.1, 31.7, 25.4, 18.8 and 20.5 dB. A float's SQNR follows its mantissa bits;
    # NVFP4's finer blocks and E4M3 scales beat MXFP4's power-of-two scales.
    assert s["int8"] > s["fp8_e4m3"] > s["mxfp6_e3m2"] > s["mxfp4"] > 15
    assert s["nvfp4"] > s["mxfp4"] + 1
    assert metrics.sqnr_db(x, x) == float("inf")
    assert metrics.relative_error(x, x) == 0
    assert metrics.max_abs_error(torch.zeros(3), torch.tensor([0.5, -0.75, 0.0])) == 0.75


@pytest.mark.parametrize("call,error,message", [
    (lambda: formats.quantize(torch.randn(4, 256), "int4", granularity="per_group", group_size=100),
     KnobError, "group_size=100: not allowed here; allowed: 16, 32, 64, 128, 256, 512"),
    (lambda: formats.quantize(torch.randn(4, 96), "int4", granularity="per_group", group_size=64),
     formats.FormatError, "group_size=64 does not divide the last dimension 96"),
    (lambda: formats.quantize(torch.randn(4, 48), "mxfp4"), formats.FormatError, "group_size=32 does not divide"),
    (lambda: formats.quantize(torch.ones(4, 8, dtype=torch.int32), "int8"), formats.FormatError, "floating-point"),
    (lambda: formats.quantize(torch.tensor([[1.0, float("nan")]]), "int8"), formats.FormatError, "int8 cannot encode"),
    (lambda: formats.quantize(torch.randn(4, 8), "fp7"), KnobError, "format=fp7: not allowed here; allowed: fp8_e4m3"),
    (lambda: formats.quantize(torch.randn(4, 32), "int8", granularity="per_block"), KnobError, "granularity=per_block"),
    (lambda: formats.quantize(torch.randn(4, 32), "mxfp4", granularity="per_channel"), KnobError, "allowed: per_block"),
    (lambda: formats.quantize(torch.randn(4, 32), "int8", scale_rule="floor"), KnobError, "allowed: absmax, mse"),
    (lambda: formats.quantize(torch.randn(4, 32), "mxfp4", overflow="nan"), KnobError, "allowed: saturate"),
    (lambda: formats.quantize(torch.randn(4, 32), "fp8_e4m3", symmetric=False), KnobError, "symmetric=False"),
])
def test_bad_formats_knobs_and_inputs_are_refused_clearly(call, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(")):
        call()


def test_torch_kernel_matches_an_fp64_matmul_of_the_dequantized_weight():
    gen = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(5, 256, generator=gen), torch.randn(64, 256, generator=gen), torch.randn(64, generator=gen)
    q = formats.quantize(w, "int4", granularity="per_group", group_size=64)
    y = registry.get_kernel("torch")(x, q, b)
    ref = x.double() @ q.dequantize(torch.float64).T + b.double()
    assert metrics.relative_error(ref, y) < 1e-6


def test_catalog_lists_exactly_the_registered_kernels():
    assert tuple(registry.KERNELS) == catalog.KERNELS
