"""GPTQ against round-to-nearest: exact where no error can move, better where it can."""

import pytest
import torch

from jobs.config import DtypeConfig, GptqOptions
from jobs.gptq import gptq_quantize, output_error
from kernels import formats

# Every scale family: fp32 per channel / tensor / group (symmetric, asymmetric, mse), E8M0 blocks, NVFP4.
FAMILIES = [("int4", {"granularity": "per_group", "group_size": 128}),
            ("int4", {"granularity": "per_group", "group_size": 32, "symmetric": False}),
            ("int4", {"granularity": "per_group", "group_size": 64, "scale_rule": "mse"}),
            ("int3", {"granularity": "per_group", "group_size": 64}),
            ("int8", {"granularity": "per_channel"}), ("int8", {"granularity": "per_tensor"}),
            ("fp8_e4m3", {"granularity": "per_channel"}), ("fp4_e2m1", {"granularity": "per_group", "group_size": 32}),
            ("mxfp4", {"granularity": "per_block"}),
            ("mxfp8_e4m3", {"granularity": "per_block", "scale_rule": "rceil"}),
            ("mxint8", {"granularity": "per_block"}), ("nvfp4", {"granularity": "per_block"})]
OPTIONS = {"default": GptqOptions(), "act_order": GptqOptions(act_order=True),
           "static_groups": GptqOptions(static_groups=True, block_size=32)}


def _dtype(fmt: str, knobs: dict) -> DtypeConfig:
    return DtypeConfig(name=fmt, format=fmt, **knobs)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("fmt,knobs", FAMILIES, ids=[f"{f}-{'-'.join(map(str, k.values()))}" for f, k in FAMILIES])
def test_with_an_identity_hessian_gptq_is_round_to_nearest_bit_for_bit(fmt, knobs, options):
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    q = gptq_quantize(weight, torch.eye(256), _dtype(fmt, knobs), options)
    rtn = formats.quantize(weight, fmt, **knobs)
    assert (q.block, q.shape) == (rtn.block, rtn.shape)
    for part in ("codes", "scales", "zero_points", "tensor_scale"):
        mine, theirs = getattr(q, part), getattr(rtn, part)
        assert (mine is None and theirs is None) or torch.equal(mine, theirs), part


def _correlated_inputs(features: int, tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are correlated, with a few large channels, as a layer's are."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=gen) / features ** 0.5 + 0.3 * torch.eye(features)
    x = torch.randn(tokens, features, generator=gen) @ mix
    x[:, :4] *= 8
    return x


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("fmt,knobs", [FAMILIES[0], FAMILIES[3], FAMILIES[8], FAMILIES[11]],
                         ids=["int4-g128", "int3-g64", "mxfp4", "nvfp4"])
def test_gptq_halves_the_output_error_of_round_to_nearest_on_correlated_inputs(fmt, knobs, options):
    x = _correlated_inputs(256)
    hessian = x.T @ x / len(x)
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    rtn = output_error(weight, formats.quantize(weight, fmt, **knobs).dequantize(), hessian)
    gptq = output_error(weight, gptq_quantize(weight, hessian, _dtype(fmt, knobs), options).dequantize(), hessian)
    assert gptq < 0.6 * rtn, (gptq, rtn)


def test_output_error_is_the_relative_error_of_the_layer_outputs():
    x = _correlated_inputs(64, tokens=512)
    weight, noisy = torch.randn(32, 64), torch.randn(32, 64)
    expected = (x @ weight.T - x @ noisy.T).pow(2).sum() / (x @ weight.T).pow(2).sum()
    assert output_error(weight, noisy, x.T @ x) == pytest.approx(float(expected), rel=1e-4)


def test_inputs_that_are_always_zero_get_zero_weights():
    hessian = torch.eye(128)
    hessian[5, 5] = hessian[77, 77] = 0
    q = gptq_quantize(torch.randn(16, 128), hessian, _dtype("int8", {"granularity": "per_channel"}), GptqOptions())
    assert (q.dequantize()[:, [5, 77]] == 0).all()
