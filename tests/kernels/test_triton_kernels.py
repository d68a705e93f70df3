"""The Triton kernels against an fp64 reference: in Triton's interpreter on CPU (fp16/fp32
activations, per DESIGN.md's interpreter limits), and on a GPU with bf16 as well."""

import pytest
import torch

from kernels import formats, gemv, metrics, registry
from kernels.catalog import Unsupported
from kernels.fp8_matmul import quantize_fp8_per_token

ON_GPU = torch.cuda.is_available()
ACT_DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])
DEVICE = "cuda" if ON_GPU else "cpu"
# odd M, N not a multiple of the tile, K a multiple of every group size below
SHAPES = [(1, 48, 256), (7, 40, 256), (17, 72, 512)]


def _check(x, q, input_knobs=None):
    y = registry.get_kernel("triton")(x, q, None, input_knobs)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], q.shape[0])
    err = metrics.relative_error(registry.reference_fp64(x, q, input_knobs), y)
    assert err < registry.TOLERANCE[x.dtype], err
    return err


def _inputs(m, n, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=gen).to(dtype).to(DEVICE), torch.randn(n, k, generator=gen).to(DEVICE))


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int4", 64), ("int4", 128), ("int8", 64), ("int8", None),
                                       ("int4", None)])
@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_w4a16_and_w8a16(m, n, k, fmt, group, dtype):
    x, w = _inputs(m, n, k, dtype)
    knobs = {"granularity": "per_group", "group_size": group} if group else {"granularity": "per_channel"}
    _check(x, formats.quantize(w, fmt, **knobs))


@pytest.mark.parametrize("k", [100, 66])
def test_per_channel_int_weights_with_k_not_a_multiple_of_the_tile(k):
    x, w = _inputs(5, 24, k, torch.float16)
    _check(x, formats.quantize(w, "int8", granularity="per_channel"))
    _check(x, formats.quantize(w, "int4", granularity="per_channel"))


@pytest.mark.parametrize("fmt,k", [("int4", 264), ("int8", 100), ("int8", 260)])
@pytest.mark.parametrize("m", [1, 4])
def test_decode_gemv_with_k_not_a_multiple_of_the_tile(fmt, k, m):
    x, w = _inputs(m, 40, k, torch.float16)
    _check(x, formats.quantize(w, fmt, granularity="per_channel"))


@pytest.mark.parametrize("fmt,knobs", [("int4", {"granularity": "per_group", "group_size": 32}),
                                       ("int4", {"granularity": "per_channel"}),
                                       ("int8", {"granularity": "per_group", "group_size": 64}),
                                       ("mxfp4", {}), ("nvfp4", {}), ("mxfp8_e4m3", {}), ("mxfp8_e5m2", {})])
def test_decode_gemv_decodes_every_code_exactly(fmt, knobs):
    """Byte b of row r holds (r + b) % 256, so over 256 rows every field position of a word holds
    every code (NaN and Inf codes of fp8 included). One-hot rows of x pick single weight columns:
    the output is the dequantized weight, bit for bit (NVFP4: its two scales may round once in
    the other order), and NaN where the reference has NaN."""
    n, k = 256, 64
    _, w = _inputs(1, n, k, torch.float32)
    q = formats.quantize(w, fmt, **knobs)
    per_row = q.codes.numel() // n
    codes = (torch.arange(n)[:, None] + torch.arange(per_row)[None, :]).remainder(256).reshape(-1).to(torch.uint8)
    if not ON_GPU:  # Triton's interpreter decodes fp8 NaN and Inf codes as finite numbers (e4m3 0x7F as 480)
        special = {"mxfp8_e4m3": (0x7F, 0x7F), "mxfp8_e5m2": (0x7C, 0x7C)}.get(fmt)
        if special:
            codes[codes & special[0] == special[1]] &= 0x83  # a finite code of the same sign
    q.codes.copy_(codes)
    dense = q.dequantize(torch.float64)
    for cols in ([0, 1, 2, 3], [4, 5, 6, 7], [13, 37, 50, 63]):
        x = torch.zeros(4, k, device=DEVICE)
        x[torch.arange(4), torch.tensor(cols)] = 1.0
        y = registry.get_kernel("triton")(x, q, None, None)
        ref = torch.nn.functional.linear(x.double(), dense.to(DEVICE)).float()
        torch.testing.assert_close(y, ref, rtol=1.2e-7 if fmt == "nvfp4" else 0, atol=0, equal_nan=True)


@pytest.mark.slow  # every config through the interpreter: ~70 s on 2 cores
@pytest.mark.parametrize("fmt,knobs", [("int4", {"granularity": "per_group", "group_size": 32}),
                                       ("int8", {"granularity": "per_channel"}), ("mxfp4", {}), ("nvfp4", {}),
                                       ("mxfp8_e5m2", {})])
def test_decode_gemv_is_right_in_every_autotune_config(fmt, knobs):
    """The interpreter runs one config; the GPU picks any: pin each (split-K up to 16, tiles wider
    than a scale block or than K, ragged N) and check it against the reference."""
    x, w = _inputs(2, 72, 640, torch.float32)
    q = formats.quantize(w, fmt, **knobs)
    n, k = q.shape
    block = k if q.block in (k, n * k) else q.block
    scales = q.scales.view(n, k // block)
    ref = registry.reference_fp64(x, q)
    for config in gemv.configs():
        y = gemv.decode_gemv(x, q, scales, block, config)
        assert metrics.relative_error(ref, y) < 1e-6, config


def test_int_weights_with_a_group_that_is_not_a_power_of_two():
    """A group of 96 (a multiple of 32 that 64-wide tiles straddle), built by hand: quantize()
    offers powers of two only, but the kernels take any multiple of 32."""
    _, w = _inputs(1, 40, 192, torch.float32)
    w[:, 96:] *= 100  # the two groups' scales differ by 100x
    by_96 = formats.quantize(w.reshape(-1, 96), "int4", granularity="per_channel")
    q = formats.QuantizedTensor(by_96.codes, by_96.scales, by_96.spec, torch.Size((40, 192)), 96)
    for m in (1, 5):  # the decode GEMV and the MMA kernel
        x, _ = _inputs(m, 1, 192, torch.float16)
        _check(x, q)


def test_split_k_gemv_is_deterministic_and_resets_its_counts():
    """The last program of a tile sums the split-K partials in a fixed order and leaves the
    counts at zero: a second launch gives the same bits (a stale count would leave it unwritten)."""
    x, w = _inputs(2, 72, 512, torch.float16)
    q = formats.quantize(w, "int4", granularity="per_group", group_size=64)
    first = registry.get_kernel("triton")(x, q, None, None)
    second = registry.get_kernel("triton")(x, q, None, None)
    assert torch.equal(first, second)
    _check(x, q)


@pytest.mark.parametrize("m,n,k", SHAPES + [(3, 20, 100)])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_fp8_w8a8(m, n, k, granularity, dtype):
    x, w = _inputs(m, n, k, dtype)
    knobs = {"fmt": "fp8_e4m3", "granularity": "per_channel", "group_size": 128, "rounding": "nearest",
             "scale_rule": None, "overflow": "saturate", "symmetric": True, "seed": 0}
    _check(x, formats.quantize(w, "fp8_e4m3", granularity=granularity), knobs)


@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_fp8_per_token_activation_quantization_is_bit_exact(dtype):
    x, _ = _inputs(9, 1, 300, dtype)
    x[3] = 0.0  # an all-zero row gets scale 1
    codes, scales = quantize_fp8_per_token(x)
    ref = formats.quantize(x, "fp8_e4m3", granularity="per_channel")
    assert torch.equal(scales, ref.scales)
    assert torch.equal(codes.view(torch.uint8), ref.element_codes())


@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_fp8_static_activation_quantization_is_bit_exact_and_saturates(dtype):
    """One calibrated scale for every row; rows it does not cover saturate at +-448, as in kernels.formats."""
    x, w = _inputs(9, 64, 300, dtype)
    scale = formats.Scales(torch.tensor([float(x.float().abs().max()) / 448 / 4]))  # clips the largest quarter
    codes, scales = quantize_fp8_per_token(x, scale.scales)
    ref = formats.quantize(x, "fp8_e4m3", granularity="per_tensor", scales=scale)
    assert torch.equal(scales, scale.scales.expand(9))
    assert torch.equal(codes.view(torch.uint8).reshape(-1), ref.element_codes().reshape(-1))
    assert (ref.dequantize().abs() == 448 * scale.scales).any()
    knobs = {"fmt": "fp8_e4m3", "granularity": "per_tensor", "group_size": 128, "rounding": "nearest",
             "scale_rule": None, "overflow": "saturate", "symmetric": True, "seed": 0, "scales": scale}
    _check(x, formats.quantize(w, "fp8_e4m3"), knobs)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8_e4m3", "mxfp8_e5m2", "nvfp4"])
@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_block_scaled_weights(m, n, k, fmt, dtype):
    x, w = _inputs(m, n, k, dtype)
    _check(x, formats.quantize(w, fmt))


@pytest.mark.parametrize("m", [2, 7])  # the decode GEMV and the MMA kernel
@pytest.mark.parametrize("fmt,emax", [("mxfp4", 2), ("mxfp8_e4m3", 8), ("mxfp8_e5m2", 15)])
def test_mx_kernels_decode_scale_byte_0_as_2_to_the_minus_127(m, fmt, emax):
    """Weights so small that most blocks' shared exponent clamps to -127 (byte 0, an fp32
    subnormal scale), and activations large enough that the products are normal fp32 numbers:
    a kernel that decoded byte 0 as 0 or as 2**-126 would be off by 100% on those rows."""
    x, w = _inputs(m, 40, 256, torch.float32)
    q = formats.quantize(w.cpu() * 2.0 ** (emax - 130), fmt).to(DEVICE)
    assert (q.scales == 0).float().mean() > 0.5
    x = x * 2.0 ** 100
    err = metrics.relative_error(registry.reference_fp64(x, q), registry.get_kernel("triton")(x, q, None, None))
    assert err < registry.TOLERANCE[x.dtype], err  # fp32's (TF32 dots on a GPU); exact in the interpreter


@pytest.mark.parametrize("fmt,knobs,input_knobs,reason", [
    ("fp6_e2m3", {}, None, "no triton kernel for fp6_e2m3"),
    ("int4", {"granularity": "per_group", "group_size": 16}, None, "group size 16 is below"),
    ("int4", {"symmetric": False}, None, "with zero points"),
    ("mxfp4", {}, {"fmt": "mxfp4", "granularity": "per_block", "group_size": 128, "rounding": "nearest",
                   "scale_rule": None, "overflow": "saturate", "symmetric": True, "seed": 0}, "activations only"),
])
def test_what_triton_does_not_implement_is_unsupported_with_the_reason(fmt, knobs, input_knobs, reason):
    x, w = _inputs(3, 32, 64, torch.float16)
    with pytest.raises(Unsupported, match=reason):
        registry.get_kernel("triton")(x, formats.quantize(w, fmt, **knobs), None, input_knobs)


def test_kernel_relative_error_reports_the_error_against_the_reference():
    _, w = _inputs(1, 40, 256, torch.float16)
    q = formats.quantize(w, "int4", granularity="per_group", group_size=64)
    assert registry.kernel_relative_error("torch", q, torch.float32, None) < 1e-6
    assert registry.kernel_relative_error("triton", q, torch.float16, None) < registry.TOLERANCE[torch.float16]
