"""Methods and static scales applied to the tiny model, on its own calibration inputs."""

import math

import pytest
import torch

from jobs import calibration, models
from jobs.config import TrialConfig
from jobs.quantize import QuantizedLinear, apply_dtype
from orchestrator.plan import trial_config
from tests.helpers import compose

CALIB = ("calib.num_sequences=32", "calib.seq_len=128")


def _quantized(*overrides):
    cfg = TrialConfig.from_dict(trial_config(compose(*overrides, *CALIB)))
    model, tokenizer = models.load_model(cfg.model, torch.device("cpu"))
    windows = calibration.calibration_windows(tokenizer, cfg.calib, cfg.eval.text, model.config.max_position_embeddings)
    rows = apply_dtype(model, cfg, torch.float32, calibration=windows)
    return model, rows


@pytest.mark.parametrize("dtype", ["int4", "int3", "mxfp4", "nvfp4"])
def test_gptq_leaves_less_output_error_than_round_to_nearest_on_every_layer(tiny_model_cfg, dtype):
    torch.manual_seed(0)
    _, rows = _quantized(f"dtype={dtype}", "method=gptq")
    assert len(rows) == 14
    for row in rows:
        assert row["method"] == "gptq" and 0 < row["output_error"] < row["output_error_rtn"], row
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean("output_error") < 0.5 * mean("output_error_rtn")


def test_static_scales_are_stored_with_each_layer_and_ordered_by_observer(tiny_model_cfg):
    scales = {}
    for observer in ("absmax", "percentile", "mse"):
        model, rows = _quantized("dtype=fp8_e4m3", "quant=w_a_static", f"quant.activation_observer={observer}",
                                 "quant.activation_percentile=99.9")
        scales[observer] = {r["layer"]: r["input_scale"] for r in rows}
        layer = model.model.layers[0].mlp.down_proj
        assert isinstance(layer, QuantizedLinear) and layer.input_knobs["granularity"] == "per_tensor"
        assert float(layer.input_knobs["scales"].scales[0]) == scales[observer]["model.layers.0.mlp.down_proj"]
    assert all(math.isfinite(s) and s > 0 for observed in scales.values() for s in observed.values())
    # The first layer's inputs come before any quantized layer, so all observers saw the same ones
    # (later layers' differ: each observer's earlier scales change them).
    first = {observer: observed["model.layers.0.self_attn.q_proj"] for observer, observed in scales.items()}
    assert first["percentile"] < first["absmax"]  # the 99.9th percentile of |x| clips the largest inputs
    assert first["mse"] <= first["absmax"]


def test_calibration_text_never_overlaps_the_eval_text(tiny_model_cfg, tmp_path):
    cfg = TrialConfig.from_dict(trial_config(compose("dtype=int4", "method=gptq", *CALIB)))
    _, tokenizer = models.load_model(cfg.model, torch.device("cpu"))
    windows = calibration.calibration_windows(tokenizer, cfg.calib, cfg.eval.text, 512)
    assert windows.shape == (32, 128)
    again = calibration.calibration_windows(tokenizer, cfg.calib, cfg.eval.text, 512)
    assert torch.equal(windows, again)  # seeded
    from jobs import data

    held_out = data.load_text("stdlib-docs", "eval").split(data.DOC_SEPARATOR)
    leaky = tmp_path / "leaky.txt"
    leaky.write_text(data.DOC_SEPARATOR.join(["some other text " * 50, held_out[3]]))
    cfg.calib.text = str(leaky)
    with pytest.raises(ValueError, match="shares 1 of its 2 documents with the eval text"):
        calibration.calibration_windows(tokenizer, cfg.calib, cfg.eval.text, 512)
