"""The trial's typed config: every shipped config reads back through it, and nothing else does."""

import dataclasses

import pytest

from jobs.config import DtypeConfig, TrialConfig, build
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
