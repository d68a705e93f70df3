"""QuaRot's rotations on the tiny model: the unquantized model's function is unchanged, and a W4A4
model with outlier channels, which round-to-nearest ruins, is recovered by the rotation."""

import pytest
import torch

from jobs import trial
from jobs.config import MethodConfig, TrialConfig
from jobs.quantize import apply_dtype
from jobs.rotation import RotatedInputLinear, rotate
from kernels.catalog import Unsupported
from orchestrator.plan import trial_config, trial_spec
from tests.helpers import compose, fp32_tiny_model, logits_of

TOKENS = torch.randint(0, 2000, (2, 48), generator=torch.Generator().manual_seed(0))




@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("size", [0, 16, 32])
def test_a_rotation_leaves_the_fp32_models_logits_as_they_were(tiny_model_cfg, kind, size):
    model = fp32_tiny_model()
    before = logits_of(model, TOKENS)
    rotate(model, MethodConfig(rotation=kind, rotation_size=size), seed=3)
    after = logits_of(model, TOKENS)
    assert isinstance(model.model.layers[0].mlp.down_proj, RotatedInputLinear)  # its input rotated online
    assert torch.allclose(after, before, rtol=0, atol=1e-5 * before.abs().max())
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))  # gains folded


def test_queries_and_keys_rotated_online_leave_the_attention_as_it_was(tiny_model_cfg, monkeypatch):
    """The KV cache path: values rotated in v_proj, queries and keys after RoPE. With the cache's
    rounding made exact, the rotated model's logits are the unrotated one's."""
    from jobs import quantize
    from kernels import formats

    model = fp32_tiny_model()
    before = logits_of(model, TOKENS)
    head = rotate(model, MethodConfig(rotation="random"), seed=1)
    seen = []
    monkeypatch.setattr(formats, "fake_quant", lambda x, **knobs: seen.append(x.shape) or x)
    quantize.quantize_kv_cache(model, {}, head)
    after = logits_of(model, TOKENS)
    assert len(seen) == 2 * len(model.model.layers)  # keys and values, per layer
    assert torch.allclose(after, before, rtol=0, atol=1e-5 * before.abs().max())


def test_the_rotation_changes_the_weights_and_spreads_a_planted_outlier(tiny_model_cfg):
    """One residual channel made 100x larger in the norm gain is, after the rotation, spread over all:
    the largest |input| of q_proj over its RMS falls."""
    model = fp32_tiny_model()
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.input_layernorm.weight[7] *= 100
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            linear.weight[:, 7] /= 100
    before = logits_of(model, TOKENS)
    seen = []
    hook = lambda _, args: seen.append(args[0].abs().amax() / args[0].pow(2).mean().sqrt())  # noqa: E731
    handle = layer.self_attn.q_proj.register_forward_pre_hook(hook)
    logits_of(model, TOKENS)
    q_before = layer.self_attn.q_proj.weight.clone()
    rotate(model, MethodConfig(rotation="hadamard"), seed=0)
    after = logits_of(model, TOKENS)
    handle.remove()
    assert torch.allclose(after, before, rtol=0, atol=1e-5 * before.abs().max())
    assert not torch.allclose(layer.self_attn.q_proj.weight, q_before)
    assert seen[1] < seen[0] / 5  # 40 -> about 4, what 256 Gaussian-like values give


def test_a_quantized_rotated_model_keeps_its_online_rotation_in_every_kernel_path(tiny_model_cfg):
    model = fp32_tiny_model()
    cfg = TrialConfig.from_dict(trial_config(compose("dtype=int8", "quant=w_a_dynamic", "method.rotation=hadamard",
                                                     "method.rotation_size=32", "model.dtype=float32")))
    apply_dtype(model, cfg, torch.float32)
    down = model.model.layers[1].mlp.down_proj
    assert down.input_rotation is not None and down.input_rotation.block == 32
    assert down.weight_q is not None


def test_a_dimension_with_no_hadamard_of_its_order_is_unsupported_with_what_to_take(tiny_model_cfg):
    model = fp32_tiny_model()
    model.config.hidden_size = 6  # no Hadamard matrix of order 6 exists
    with pytest.raises(Unsupported, match=r"method.rotation=hadamard method.rotation_size=0: the hidden size \(6\)"):
        rotate(model, MethodConfig(rotation="hadamard"), seed=0)


def _kl(*overrides) -> float:
    result = trial.run(trial_spec(compose(*overrides, "debug=fast"), overrides))
    assert result.status.value == "FINISHED", result.reason
    return result.metrics["kl_divergence"]


@pytest.mark.slow  # three trials, one with its own reference: ~25 s quiet
def test_w4a4_with_planted_outliers_is_ruined_by_rtn_and_recovered_by_a_rotation(tiny_model_cfg):
    """Seeded: four residual and four MLP channels x32 (model=tiny-llama-outliers). Per-token int4 inputs
    lose every other channel to the outliers' scale; a Hadamard rotation spreads them first."""
    scheme = ("dtype=int4", "quant=w_a_dynamic")
    plain_rtn = _kl(*scheme)
    outliers_rtn = _kl("model=tiny-llama-outliers", *scheme)
    outliers_rotated = _kl("model=tiny-llama-outliers", *scheme, "method.rotation=hadamard")
    assert outliers_rtn > 20 * plain_rtn  # the outliers ruin round-to-nearest
    assert outliers_rotated < plain_rtn  # the rotation recovers all of it, and more
