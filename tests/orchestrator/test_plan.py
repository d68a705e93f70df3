import pytest

from orchestrator.errors import ConfigError
from orchestrator.plan import sweep_settings, trial_spec
from tests.helpers import compose


def test_trial_key_depends_on_the_resolved_config_not_on_the_override_strings():
    a = trial_spec(compose("dtype=int4", "bench.batch_size=2"), ["dtype=int4", "bench.batch_size=2"])
    b = trial_spec(compose("bench.batch_size=2", "dtype=int4"), ["bench.batch_size=2", "dtype=int4"])
    c = trial_spec(compose("dtype=int4", "dtype.group_size=128", "bench.batch_size=2"), [])  # 128 is the default
    assert a.trial_key == b.trial_key == c.trial_key
    assert trial_spec(compose("dtype=int4"), []).trial_key != a.trial_key


def test_where_results_go_does_not_change_the_trial_key():
    a = trial_spec(compose(), [])
    b = trial_spec(compose("tracking.uri=sqlite:///other.db", "sweep.name=x", "resources.num_cpus=2"), [])
    assert a.trial_key == b.trial_key


@pytest.mark.parametrize("override,message", [
    ("bench.batch_size=0", "bench.batch_size=0: invalid value; allowed: >= 1"),
    ("dtype.granularity=per_row", "dtype.granularity=per_row: invalid value; allowed: per_tensor, per_channel, per_group"),
    ("kernel.name=cutlass", "kernel.name=cutlass: invalid value; allowed: torch"),
    ("model.build.lr=0", "model.build.lr=0.0: invalid value; allowed: > 0"),
    ("device=tpu", "device=tpu: invalid value; allowed: auto, cpu, cuda"),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as info:
        trial_spec(compose(override), [override])
    assert str(info.value) == message


def test_sweep_level_settings_must_not_vary_across_cells():
    with pytest.raises(ConfigError, match="cluster=.*varies across the sweep"):
        sweep_settings([compose(), compose("cluster.num_cpus=1")])
    assert sweep_settings([compose("dtype=int8"), compose("dtype=int4")]).sweep.name == "default"
