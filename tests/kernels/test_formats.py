import pytest
import torch

from kernels import catalog, formats, registry


def test_int8_per_channel_codes_and_scales_are_exact():
    w = torch.tensor([[-1.0, 0.5, 1.0, 0.25], [0.0, 0.0, 0.0, 0.0]])
    q = formats.quantize(w, "int8", granularity="per_channel")
    assert torch.equal(q.scales, torch.tensor([1.0 / 127, 1.0]))  # an all-zero row gets scale 1
    # 0.5 * 127 = 63.5 and 0.25 * 127 = 31.75: round half to even gives 64, 32.
    assert q.codes.tolist() == [[-127, 64, 127, 32], [0, 0, 0, 0]]
    assert q.codes.dtype == torch.int8


def test_int4_group_codes_saturate_at_qmax_and_pack_two_per_byte():
    w = torch.arange(-8, 8, dtype=torch.float32).repeat(2, 1)  # groups of 8 along K=16
    q = formats.quantize(w, "int4", granularity="per_group", group_size=8)
    assert q.codes.shape == (2, 8) and q.codes.dtype == torch.uint8
    codes = q.int_codes()
    assert codes.min() == -7 and codes.max() == 7
    assert torch.equal(q.scales, torch.tensor([8 / 7, 7 / 7] * 2))
    assert q.bits_per_element == 4 + 32 / 8


@pytest.mark.parametrize("shape", [(3, 64), (16, 256)])
def test_int4_pack_unpack_round_trips_every_code(shape):
    codes = torch.randint(-8, 8, shape, dtype=torch.int8)
    assert torch.equal(formats.unpack_int4(formats.pack_int4(codes)), codes)


@pytest.mark.parametrize("fmt,gran,group", [("int8", "per_channel", 128), ("int4", "per_group", 32),
                                            ("int4", "per_group", 128), ("int8", "per_tensor", 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_equals_fake_quant_and_stays_on_the_grid(fmt, gran, group, dtype):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    q = formats.quantize(x, fmt, granularity=gran, group_size=group)
    fq = formats.fake_quant(x, fmt, granularity=gran, group_size=group)
    assert fq.dtype == x.dtype and fq.shape == x.shape
    assert torch.equal(q.dequantize(dtype), fq)
    # Quantizing a quantized tensor again changes nothing (the grid is a fixed point).
    assert torch.equal(formats.quantize(q.dequantize(), fmt, granularity=gran, group_size=group).int_codes(),
                       q.int_codes())


def test_sqnr_orders_int8_above_int4():
    x = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    s8 = formats.sqnr_db(x, formats.fake_quant(x, "int8", granularity="per_channel"))
    s4 = formats.sqnr_db(x, formats.fake_quant(x, "int4", granularity="per_group", group_size=128))
    # Uniform quantization gains ~6 dB per bit: 4 more bits is ~24 dB.
    assert 20 < s8 - s4 < 28
    assert formats.sqnr_db(x, x) == float("inf")


def test_group_size_that_does_not_divide_is_refused():
    with pytest.raises(formats.FormatError, match="group_size=100 does not divide the input dimension 256"):
        formats.quantize(torch.randn(4, 256), "int4", granularity="per_group", group_size=100)


def test_bad_inputs_are_refused_with_the_allowed_values():
    with pytest.raises(formats.FormatError, match="floating-point"):
        formats.quantize(torch.ones(4, 8, dtype=torch.int32), "int8")
    with pytest.raises(formats.FormatError, match="unknown format 'int3'; allowed: int8, int4"):
        formats.quantize(torch.randn(4, 8), "int3")
    with pytest.raises(formats.FormatError, match="unknown granularity"):
        formats.quantize(torch.randn(4, 8), "int8", granularity="per_row")


def test_torch_kernel_matches_an_fp64_matmul_of_the_dequantized_weight():
    gen = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(5, 256, generator=gen), torch.randn(64, 256, generator=gen), torch.randn(64, generator=gen)
    q = formats.quantize(w, "int4", granularity="per_group", group_size=64)
    y = registry.get_kernel("torch")(x, q, b)
    ref = x.double() @ q.dequantize(torch.float64).T + b.double()
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-6


def test_catalog_lists_exactly_the_registered_kernels_and_formats():
    assert tuple(registry.KERNELS) == catalog.KERNELS
    assert set(formats.FORMATS) == set(catalog.FORMATS)
