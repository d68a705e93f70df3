"""torchao's kernels on our codes and scales: the same numbers as the reference."""

import pytest
import torch

from kernels import formats, metrics, registry
from kernels.catalog import Unsupported

pytest.importorskip("torchao")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
CASES = [("int8", {"granularity": "per_channel"}), ("int8", {"granularity": "per_group", "group_size": 64}),
         ("int8", {"granularity": "per_tensor"}), ("int4", {"granularity": "per_group", "group_size": 32}),
         ("int4", {"granularity": "per_group", "group_size": 128}), ("fp8_e4m3", {"granularity": "per_channel"}),
         ("nvfp4", {})]


def _inputs(m, n, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(dtype).to(DEVICE), torch.randn(n, k, generator=gen).to(DEVICE)


@pytest.mark.parametrize("fmt,knobs", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torchao_computes_what_the_reference_computes(fmt, knobs, dtype):
    x, w = _inputs(7, 40, 256, dtype)
    q = formats.quantize(w, fmt, **knobs)
    bias = torch.randn(40, dtype=dtype, device=DEVICE)
    y = registry.get_kernel("torchao")(x, q, bias, None)
    assert y.dtype == dtype and y.shape == (7, 40)
    ref = registry.reference_fp64(x, q) + bias.double()
    err = metrics.relative_error(ref, y)
    # fp32: the same codes and scales, so only summation order differs.
    assert err < (1e-5 if dtype == torch.float32 else registry.TOLERANCE[dtype]), err


def test_the_wrapped_weight_is_made_once_per_dtype():
    x, w = _inputs(3, 40, 256, torch.float32)
    q = formats.quantize(w, "int8")
    kernel = registry.get_kernel("torchao")
    kernel(x, q, None, None)
    kernel(x, q, None, None)
    kernel(x.half(), q, None, None)
    assert len(q.prepared) == 2


@pytest.mark.parametrize("fmt,knobs,reason", [
    ("mxfp4", {}, "no torchao kernel for mxfp4"),
    ("int8", {"symmetric": False}, "asymmetric"),
    ("fp6_e2m3", {}, "no torchao kernel for fp6_e2m3"),
])
def test_schemes_torchao_lacks_are_unsupported_with_what_it_has(fmt, knobs, reason):
    x, w = _inputs(3, 40, 256, torch.float32)
    with pytest.raises(Unsupported, match=reason) as info:
        registry.get_kernel("torchao")(x, formats.quantize(w, fmt, **knobs), None, None)
    assert "torchao here: int8/int4" in str(info.value)


@pytest.mark.skipif(ON_GPU and torch.cuda.get_device_capability() >= (8, 9), reason="fp8 W8A8 runs here")
def test_fp8_w8a8_below_sm89_is_unsupported():
    x, w = _inputs(3, 40, 256, torch.float32)
    knobs = {"fmt": "fp8_e4m3", "granularity": "per_channel", "group_size": 128, "rounding": "nearest",
             "scale_rule": None, "overflow": "saturate", "symmetric": True, "seed": 0}
    with pytest.raises(Unsupported, match="compute capability >= 8.9"):
        registry.get_kernel("torchao")(x, formats.quantize(w, "fp8_e4m3"), None, knobs)
