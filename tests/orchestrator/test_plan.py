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
    ("dtype.granularity=per_row", "dtype.granularity=per_row: invalid value; allowed: per_tensor, per_channel, per_group, per_block"),
    ("kernel.name=cutlass", "kernel.name=cutlass: invalid value; allowed: torch"),
    ("model.build.lr=0", "model.build.lr=0.0: invalid value; allowed: > 0"),
    ("device=tpu", "device=tpu: invalid value; allowed: auto, cpu, cuda"),
    ("dtype.format=fp7", "dtype.format=fp7: invalid value; allowed: null, fp8_e4m3, fp8_e5m2"),
    ("dtype.rounding=up", "dtype.rounding=up: invalid value; allowed: nearest, stochastic"),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as info:
        trial_spec(compose(override), [override])
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("overrides,message", [
    (["dtype=mxfp4", "dtype.scale_rule=absmax"], "dtype.scale_rule=absmax: invalid value; allowed for mxfp4: floor, ceil, even, rceil"),
    (["dtype=int4", "dtype.group_size=100"], "dtype.group_size=100: invalid value; allowed for int4: 16, 32, 64, 128, 256, 512"),
    (["dtype=int8", "dtype.granularity=per_block"], "dtype.granularity=per_block: invalid value; allowed for int8: per_tensor, per_channel, per_group"),
    (["dtype=nvfp4", "dtype.granularity=per_group"], "dtype.granularity=per_group: invalid value; allowed for nvfp4: per_block"),
    (["dtype=fp4_e2m1", "dtype.overflow=nan"], "dtype.overflow=nan: invalid value; allowed for fp4_e2m1: saturate"),
    (["dtype=fp8_e4m3", "dtype.symmetric=false"], "dtype.symmetric=False: invalid value; allowed for fp8_e4m3: True"),
    (["dtype=int4", "quant.weights=false"], "quant=weight_only: quantizes nothing; at least one of quant.weights"),
])
def test_knobs_that_do_not_fit_the_format_are_refused_before_submission(overrides, message):
    with pytest.raises(ConfigError) as info:
        trial_spec(compose(*overrides), overrides)
    assert str(info.value).startswith(message)


def test_every_shipped_dtype_and_quant_config_composes_and_validates():
    from orchestrator.paths import CONF_DIR

    for group in ("dtype", "quant"):
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            trial_spec(compose(f"{group}={path.stem}"), [])


def test_sweep_level_settings_must_not_vary_across_cells():
    with pytest.raises(ConfigError, match=r"cluster.num_cpus=1: varies across the sweep; one value for the whole sweep \(first cell: None\)"):
        sweep_settings([compose(), compose("cluster.num_cpus=1")])
    assert sweep_settings([compose("dtype=int8"), compose("dtype=int4")]).sweep.name == "default"


@pytest.mark.parametrize("overrides,message", [
    (["backend=vllm", "backend.vllm.tensor_parallel_size=2"],
     "backend.vllm.tensor_parallel_size=2: invalid value; allowed: <= resources.num_gpus (0)"),
    (["backend=vllm", "backend.vllm.tensor_parallel_size=4", "resources.num_gpus=2"],
     "backend.vllm.tensor_parallel_size=4: invalid value; allowed: <= resources.num_gpus (2)"),
    (["backend=vllm", "backend.vllm.max_model_len=128"],
     "backend.vllm.max_model_len=128: invalid value; allowed: >= 257 (bench.prompt_len + 1 + bench.decode_tokens, "
     "and eval.seq_len + 1)"),
    (["backend=vllm", "backend.vllm.logprobs_top_k=0"],
     "backend.vllm.logprobs_top_k=0: invalid value; allowed: -1 (the whole vocabulary) or >= 1"),
    (["backend=vllm", "backend.vllm.gpu_memory_utilization=1.5"],
     "backend.vllm.gpu_memory_utilization=1.5: invalid value; allowed: <= 1"),
])
def test_vllm_options_the_engine_would_refuse_are_refused_before_submission(overrides, message):
    with pytest.raises(ConfigError) as info:
        trial_spec(compose(*overrides), overrides)
    assert str(info.value).startswith(message)


def test_a_trial_keeps_only_its_own_backends_options():
    """One override serves a sweep over backends; it changes only the trials of its backend."""
    hf, vllm = (trial_spec(compose(f"backend={b}"), []) for b in ("hf", "vllm"))
    assert hf.config["backend"] == {"name": "hf"}
    assert vllm.config["backend"]["vllm"]["tensor_parallel_size"] == 1 and "noop" not in vllm.config["backend"]
    eager = "backend.vllm.enforce_eager=true"
    assert trial_spec(compose("backend=hf", eager), [eager]).trial_key == hf.trial_key
    assert trial_spec(compose("backend=vllm", eager), [eager]).trial_key != vllm.trial_key


@pytest.mark.parametrize("overrides,key", [
    ((), "777219dad3e0ccf1"),
    (("dtype=int4",), "af2bda50a10a64cf"),
    (("backend=vllm", "dtype=fp8_e4m3", "quant=w_a_dynamic"), "e5511ffdaf362d81"),
])
def test_trial_keys_do_not_move_between_versions(overrides, key):
    """Keys of sweeps already in a store: a new setting at its default must leave them as they were."""
    assert trial_spec(compose(*overrides), list(overrides)).trial_key == key
