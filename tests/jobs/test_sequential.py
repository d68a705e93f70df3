"""The calibration walk on the tiny model: model order, shared inputs, and each layer's inputs
taken after the layers before it were quantized."""

import torch
from torch import nn

from jobs import models
from jobs.config import TrialConfig
from jobs.sequential import calibrate, decoder_blocks
from orchestrator.plan import trial_config
from tests.helpers import compose

WINDOWS = torch.randint(0, 2000, (6, 32), generator=torch.Generator().manual_seed(0))


def _model(tiny_model_cfg):
    cfg = TrialConfig.from_dict(trial_config(compose()))
    return models.load_model(cfg.model, torch.device("cpu"))[0]


def _linears(model, skip=("lm_head",)):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] not in skip]


def test_groups_come_in_model_order_and_share_their_input(tiny_model_cfg):
    model = _model(tiny_model_cfg)
    assert decoder_blocks(model) is model.model.layers
    seen = []
    calibrate(model, WINDOWS, 4, _linears(model, skip=()), lambda group, inputs: seen.append(
        ([n.split(".", 3)[-1] for n, _ in group], inputs.tokens)))
    per_block = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                 ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert [names for names, _ in seen] == per_block + per_block + [["lm_head"]]  # lm_head: outside the blocks, last
    assert {tokens for _, tokens in seen} == {WINDOWS.numel()}


def test_each_layer_sees_the_inputs_left_by_the_layers_already_quantized(tiny_model_cfg):
    """Zeroing the first layers' weights as they are 'quantized' must change what the later ones see;
    the Hessians of the whole model's first group must not change."""
    def hessians(zero_out: bool) -> dict:
        model, out = _model(tiny_model_cfg), {}

        def finish(group, inputs):
            for name, linear in group:
                out[name] = inputs.hessian.clone()
                if zero_out:
                    linear.weight.data.zero_()
        calibrate(model, WINDOWS, 4, _linears(model), finish)
        return out

    plain, zeroed = hessians(False), hessians(True)
    first = "model.layers.0.self_attn.q_proj"
    assert torch.equal(plain[first], zeroed[first])
    # After o_proj is zeroed, attention adds nothing: the MLP sees the residual stream alone.
    assert not torch.allclose(plain["model.layers.0.mlp.gate_proj"], zeroed["model.layers.0.mlp.gate_proj"])
    assert not torch.allclose(plain["model.layers.1.self_attn.q_proj"], zeroed["model.layers.1.self_attn.q_proj"])


def test_the_walk_matches_the_plain_forward_pass(tiny_model_cfg):
    """Block by block on cached inputs computes what the model computes: the last block's group sees
    the same inputs as a hook on the whole model's forward pass."""
    model = _model(tiny_model_cfg)
    down = model.model.layers[1].mlp.down_proj
    expected = []
    handle = down.register_forward_pre_hook(lambda m, args: expected.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in WINDOWS.split(4):
            model(batch, use_cache=False)
    handle.remove()
    x = torch.cat(expected).float()
    walked = {}
    calibrate(model, WINDOWS, 4, _linears(model), lambda group, inputs: walked.update({group[0][0]: inputs}))
    inputs = walked["model.layers.1.mlp.down_proj"]
    torch.testing.assert_close(inputs.hessian, x.T @ x / len(x), rtol=1e-4, atol=1e-6)
    assert inputs.amax == float(x.abs().max())
