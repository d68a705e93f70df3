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


MIXED = ("dtype=int4", 'quant.rules=[{match:"*.mlp.down_proj",dtype:int8},{match:"model.layers.0.*",dtype:bf16},'
                       '{match:"*.self_attn.*",dtype:mxfp4}]')


def _mixed(kernel="torch"):
    from orchestrator.plan import trial_spec

    cfg = TrialConfig.from_dict(trial_spec(compose(*MIXED, f"kernel={kernel}"), []).config)
    model, _ = models.load_model(cfg.model, torch.device("cpu"))
    return model, apply_dtype(model, cfg, torch.float32)


def test_rules_quantize_each_layer_to_its_own_dtype_and_its_record_names_the_rule(tiny_model_cfg):
    model, rows = _mixed()
    by_layer = {r["layer"]: r for r in rows}
    assert len(rows) == 14 and [r["layer"] for r in rows][0] == "model.layers.0.self_attn.q_proj"  # model order
    expected = {"model.layers.0.mlp.down_proj": ("int8", "0: *.mlp.down_proj"),
                "model.layers.0.self_attn.q_proj": ("float32", "1: model.layers.0.*"),  # kept, at the compute dtype
                "model.layers.1.self_attn.o_proj": ("mxfp4", "2: *.self_attn.*"),
                "model.layers.1.mlp.up_proj": ("int4", "trial")}
    for name, (fmt, rule) in expected.items():
        assert (by_layer[name]["format"], by_layer[name]["rule"]) == (fmt, rule)
    assert by_layer["model.layers.0.self_attn.q_proj"]["bits_per_element"] == 32.0
    assert not isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)
    assert model.model.layers[1].self_attn.o_proj.weight_q.spec.name == "mxfp4"


def test_the_kernel_gate_checks_every_distinct_shape_and_format_of_a_mixed_model(tiny_model_cfg):
    from jobs.quantize import check_kernel

    model, _ = _mixed("triton")
    checked = check_kernel(model, "triton", torch.float32)
    # int8 down_proj 256x768, mxfp4 attention 256x256, int4 gate/up 768x256 (layer 1's): each its own case
    assert sorted((r["shape"], r["format"]) for r in checked) == [
        ("256x256", "mxfp4"), ("256x768", "int8"), ("768x256", "int4")]
    assert all(r["relative_error"] <= r["tolerance"] for r in checked)
