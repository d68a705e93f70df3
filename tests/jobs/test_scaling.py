"""SmoothQuant and AWQ scales, and planted outliers: each leaves the unquantized model's function as it
was; AWQ's choice is never worse than the identity on its objective, measured on the inputs themselves."""

import pytest
import torch
from torch import nn

from jobs.config import MethodConfig, OutlierPlant
from jobs.decoder import move_scales
from jobs.scaling import awq_search, plant_outliers, scale_model
from jobs.sequential import LayerInputs
from kernels import formats
from tests.helpers import fp32_tiny_model, logits_of

TOKENS = torch.randint(0, 2000, (2, 48), generator=torch.Generator().manual_seed(0))
WINDOWS = torch.randint(0, 2000, (8, 64), generator=torch.Generator().manual_seed(1))




def _int4(w: torch.Tensor) -> torch.Tensor:
    return formats.quantize(w, "int4", "per_group", 128).dequantize()


@pytest.mark.parametrize("scaling", ["smoothquant", "awq"])
def test_scales_moved_without_quantizing_leave_the_logits_as_they_were(tiny_model_cfg, scaling):
    model = fp32_tiny_model()
    before = logits_of(model, TOKENS)
    dequantizers = {n: _int4 for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    notes = scale_model(model, WINDOWS, MethodConfig(scaling=scaling), batch_size=4, seed=0,
                        dequantizers=dequantizers)
    assert torch.allclose(logits_of(model, TOKENS), before, rtol=0, atol=1e-5 * before.abs().max())
    per_block = 5 if scaling == "smoothquant" else 7  # q k v gate up (+ o, down: AWQ's v->o and up->down)
    assert len(notes) == per_block * len(model.model.layers)
    if scaling == "smoothquant":  # its scales went into the norms' gains
        norm = model.model.layers[0].input_layernorm.weight
        assert not torch.allclose(norm, torch.ones_like(norm))


def test_planted_outliers_leave_the_function_and_make_outlier_inputs(tiny_model_cfg):
    model = fp32_tiny_model()
    before = logits_of(model, TOKENS)
    seen = []
    plant_outliers(model, OutlierPlant(channels=4, scale=32.0, seed=0))
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda _, a: seen.append(a[0]))
    assert torch.allclose(logits_of(model, TOKENS), before, rtol=0, atol=1e-5 * before.abs().max())
    handle.remove()
    channel_amax = seen[0].abs().reshape(-1, seen[0].shape[-1]).amax(dim=0)
    assert (channel_amax > 8 * channel_amax.median()).sum() >= 4


def test_awq_scales_are_never_worse_than_the_identity_on_the_inputs_themselves():
    """The search's objective computed on the inputs (not from their second moment): the output error
    of int4 weights under the chosen scales, inputs divided by them, is at most the unscaled one's."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 256, generator=gen) * torch.where(torch.arange(256) % 37 == 0, 20.0, 1.0)
    linears = [nn.Linear(256, 64, bias=False) for _ in range(2)]
    for linear in linears:
        nn.init.normal_(linear.weight, generator=gen)
    inputs = LayerInputs(x.T @ x, tokens=x.shape[0], channel_abs_sum=x.abs().sum(dim=0))
    scales, alpha, errors = awq_search([(m, _int4) for m in linears], inputs, grid=20)
    assert len(errors) == 20 and alpha > 0  # the outlier channels make a non-trivial choice

    def error(s):
        return sum(float(((x @ m.weight.T - (x / s) @ _int4(m.weight * s).T) ** 2).sum()) for m in linears)

    identity = error(torch.ones(256))
    assert error(scales) <= identity
    assert errors[0] == pytest.approx(identity / x.shape[0], rel=1e-3)  # the Hessian objective is the same one


def test_moving_scales_into_a_linear_layer_keeps_its_readers_outputs():
    gen = torch.Generator().manual_seed(0)
    up, down = nn.Linear(8, 16), nn.Linear(16, 4)
    x = torch.randn(3, 8, generator=gen)
    before = down(up(x))
    move_scales(up, [down], torch.rand(16, generator=gen) + 0.5)
    assert torch.allclose(down(up(x)), before, atol=1e-6)
