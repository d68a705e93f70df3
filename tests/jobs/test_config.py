"""The trial's typed config: every shipped config reads back through it, and nothing else does."""

import dataclasses

import pytest

from jobs.config import DtypeConfig, TrialConfig, build, layer_dtypes, layer_scheme, uses_calibration
from orchestrator.paths import CONF_DIR
from orchestrator.plan import trial_spec
from tests.helpers import compose

GROUPS = ("model", "dtype", "quant", "kernel", "backend")


def _shipped():
    return [f"{group}={path.stem}" for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]


def _same(typed, plain: dict) -> None:
    """Every key of ``plain`` reads back from ``typed`` as the same value."""
    for key, value in plain.items():
        got = getattr(typed, key)
        if isinstance(value, dict):
            _same(got, value)
        else:
            assert got == value and type(got) is type(value), (key, got, value)


@pytest.mark.parametrize("override", _shipped())
def test_every_shipped_config_reads_back_typed_as_it_travels(override):
    spec = trial_spec(compose(override), [override])
    settings = spec.settings
    assert isinstance(settings, TrialConfig) and isinstance(settings.dtype, DtypeConfig)
    _same(settings, spec.config)


def test_a_trials_other_backends_take_their_defaults():
    settings = trial_spec(compose("backend=hf"), []).settings
    assert "vllm" not in trial_spec(compose("backend=hf"), []).config["backend"]
    assert settings.backend.vllm.logprobs_top_k == 256


def test_an_unknown_or_missing_key_is_refused():
    config = trial_spec(compose(), []).config
    with pytest.raises(ValueError, match=r"^eval.max_tokns: not a key of EvalConfig; allowed: batch_size, max_tokens"):
        TrialConfig.from_dict({**config, "eval": {**config["eval"], "max_tokns": 1}})
    with pytest.raises(ValueError, match=r"^dtype.name: missing"):
        build(DtypeConfig, {"format": "int4"}, "dtype.")
    with pytest.raises(ValueError, match=r"^model: missing"):
        TrialConfig.from_dict({k: v for k, v in config.items() if k != "model"})


def test_the_typed_view_leaves_the_plain_config_and_its_key_alone():
    spec = trial_spec(compose("dtype=int4"), [])
    before = (spec.trial_key, dict(spec.config))
    assert dataclasses.asdict(spec.settings.dtype) == spec.config["dtype"]
    assert (spec.trial_key, spec.config) == before


def test_a_layer_takes_the_first_rule_that_matches_and_a_skipped_layer_none():
    cfg = TrialConfig.from_dict(trial_spec(compose(
        "dtype=int4", 'quant.rules=[{match:"*.mlp.down_proj",dtype:int8},{match:"model.layers.0.*",dtype:bf16,'
                      'method:gptq}]'), []).config)
    down, first, other = (layer_scheme(cfg, n) for n in ("model.layers.0.mlp.down_proj",
                                                         "model.layers.0.self_attn.q_proj",
                                                         "model.layers.1.mlp.up_proj"))
    assert (down.dtype.name, down.rule, down.label) == ("int8", 0, "0: *.mlp.down_proj")
    assert (first.dtype.format, first.rule, first.method) == (None, 1, "rtn")  # nothing to round: no method kept
    assert (other.dtype.name, other.rule, other.label, other.method) == ("int4", None, "trial", "rtn")
    assert layer_scheme(cfg, "lm_head") is None  # quant.skip_layers come before any rule
    assert [d.name for d in layer_dtypes(cfg)] == ["int4", "int8", "bf16"]


def test_a_rule_rounding_by_gptq_makes_the_trial_calibrate():
    plain = trial_spec(compose("dtype=bf16", 'quant.rules=[{match:"*.mlp.*",dtype:int4,method:gptq}]'), []).config
    cfg = TrialConfig.from_dict(plain)
    assert uses_calibration(cfg) and "calib" in plain and plain["method"]["gptq"]["damp"] == 0.01
    assert not uses_calibration(TrialConfig.from_dict(trial_spec(compose(
        "dtype=bf16", 'quant.rules=[{match:"*.mlp.*",dtype:int4}]'), []).config))
