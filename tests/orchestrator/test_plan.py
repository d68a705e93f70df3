import re

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


def test_a_method_and_its_calibration_are_part_of_the_key_only_where_they_act():
    def key(*overrides):
        return trial_spec(compose(*overrides), list(overrides))

    rtn, gptq = key("dtype=int4"), key("dtype=int4", "method=gptq")
    assert rtn.trial_key == "af2bda50a10a64cf" and gptq.trial_key != rtn.trial_key
    assert "calib" not in rtn.config and rtn.config["method"] == {"name": "rtn"}
    assert gptq.config["method"]["gptq"]["damp"] == 0.01 and gptq.config["calib"]["num_sequences"] == 128
    # Calibration settings move only the keys of trials that calibrate.
    assert key("dtype=int4", "calib.seed=1").trial_key == rtn.trial_key
    assert key("dtype=int4", "method=gptq", "calib.seed=1").trial_key != gptq.trial_key
    assert key("dtype=int4", "method=gptq", "method.gptq.act_order=true").trial_key != gptq.trial_key
    # Nothing to quantize, nothing for a method to do: bf16 under gptq is the bf16 trial.
    assert key("method=gptq").trial_key == key().trial_key
    # Static activation scales calibrate too; the observer counts only for them.
    dynamic = key("dtype=fp8_e4m3", "quant=w_a_dynamic")
    assert key("dtype=fp8_e4m3", "quant=w_a_dynamic", "quant.activation_observer=mse").trial_key == dynamic.trial_key
    static = key("dtype=fp8_e4m3", "quant=w_a_static")
    assert "calib" in static.config and static.trial_key != dynamic.trial_key
    assert key("dtype=fp8_e4m3", "quant=w_a_static", "quant.activation_observer=mse").trial_key != static.trial_key


def test_a_transform_is_part_of_the_key_only_where_it_is_on_and_acts():
    def spec(*overrides):
        return trial_spec(compose(*overrides), list(overrides))

    plain = spec("dtype=int4")
    # Off (the defaults) or with nothing quantized, a transform leaves the key as it was.
    assert spec("dtype=int4", "method.rotation_size=32", "method.awq.grid=5").trial_key == plain.trial_key
    assert spec("method.rotation=hadamard").trial_key == spec().trial_key  # a plain cast
    rotated = spec("dtype=int4", "method.rotation=hadamard")
    assert rotated.config["method"] == {"name": "rtn", "rotation": "hadamard", "rotation_size": 0}
    assert "calib" not in rotated.config  # a rotation needs no data
    assert spec("dtype=int4", "method.rotation=hadamard", "method.rotation_size=32").trial_key != rotated.trial_key
    awq = spec("dtype=int4", "method=gptq", "method.scaling=awq", "method.clip=true")
    assert awq.config["method"] == {"name": "gptq", "gptq": awq.config["method"]["gptq"], "scaling": "awq",
                                    "awq": {"grid": 20}, "clip": True, "clip_grid": 20, "clip_min": 0.5}
    assert "calib" in awq.config and "calib" in spec("dtype=int4", "method.clip=true").config
    # Without quantized weights the rounding and the clipping have nothing to act on; SmoothQuant still does.
    inputs_only = spec("dtype=int8", "quant=w_a_dynamic", "quant.weights=false", "method=gptq", "method.clip=true",
                       "method.scaling=smoothquant")
    assert inputs_only.config["method"] == {"name": "rtn", "scaling": "smoothquant", "smoothquant": {"alpha": 0.5}}


@pytest.mark.parametrize("overrides,message", [
    (["dtype=int4", "method=gptq", "dtype.rounding=stochastic"],
     "dtype.rounding=stochastic: invalid value; allowed with method=gptq: nearest"),
    (["dtype=mxfp4", "quant=w_a_static"], "quant.activation_scales=static: invalid value; allowed for mxfp4: dynamic"),
    (["dtype=int8", "quant.activation_scales=static"],
     "quant.activation_scales=static: invalid value; allowed without quant.activations: dynamic"),
    (["method=bogus"], "Could not find 'method/bogus'"),
    (["method=gptq", "method.gptq.damp=0"], "method.gptq.damp=0.0: invalid value; allowed: > 0"),
    (["calib.num_sequences=0"], "calib.num_sequences=0: invalid value; allowed: >= 1"),
    (["dtype=int4", "quant=w_a_dynamic", "method.rotation=hadamard", "method.scaling=smoothquant"],
     "method.scaling=smoothquant: invalid value; allowed with method.rotation=hadamard: none (a rotation spreads"),
    (["dtype=int4", "method.scaling=smoothquant"],
     "method.scaling=smoothquant: invalid value; allowed with quant=weight_only (weights only): none or awq"),
    (["dtype=int8", "quant=kv_cache", "method.scaling=awq"],
     "method.scaling=awq: invalid value; allowed with quant=kv_cache (weights not quantized): none or smoothquant"),
    (["dtype=int4", "method.clip=true", "dtype.scale_rule=mse"],
     "dtype.scale_rule=mse: invalid value; allowed with method.clip=true: the format's others"),
    (["dtype=fp8_e4m3", "method.clip=true", "dtype.overflow=nan"],
     "dtype.overflow=nan: invalid value; allowed with method.clip=true: saturate"),
    (["method.rotation=givens"], "method.rotation=givens: invalid value; allowed: none, hadamard, random"),
    (["method.rotation_size=24"], "method.rotation_size=24: invalid value; allowed: 0, 8, 16, 32, 64, 128, 256, 512"),
])
def test_bad_method_settings_are_refused_before_submission(overrides, message):
    with pytest.raises(Exception, match=re.escape(message)):
        trial_spec(compose(*overrides), overrides)


def test_calibrating_on_the_eval_text_is_refused(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("a text to evaluate on " * 100)
    overrides = ["dtype=int4", "method=gptq", f"eval.text={text}", f"calib.text={text}"]
    with pytest.raises(ConfigError, match=r"calib\.text=.*mine\.txt: is the eval text; allowed: any text but"):
        trial_spec(compose(*overrides), overrides)


def _rules(*rules: str) -> str:
    return "quant.rules=[" + ",".join(rules) + "]"


def test_a_rule_names_a_dtype_resolved_into_the_key_and_no_rules_keep_the_key_they_had():
    named = trial_spec(compose("dtype=int4", _rules('{match:"*.mlp.*",dtype:int8}')), [])
    inline = trial_spec(compose("dtype=int4", _rules('{match:"*.mlp.*",dtype:{name:int8,format:int8}}')), [])
    assert named.config["quant"]["rules"][0]["dtype"]["format"] == "int8"
    assert "compute_dtype" not in named.config["quant"]["rules"][0]["dtype"]  # the model computes in the trial's
    assert named.trial_key == inline.trial_key  # the same settings, however written
    assert named.trial_key != trial_spec(compose("dtype=int4"), []).trial_key
    no_rules = trial_spec(compose("dtype=int4", "quant.rules=[]"), [])
    assert no_rules.trial_key == trial_spec(compose("dtype=int4"), []).trial_key


@pytest.mark.parametrize("rules,message", [
    ([ '{match:"*.mlp.gate",dtype:int8}'],
     "quant.rules[0].match=*.mlp.gate: matches no quantizable layer of tiny-llama; allowed: a glob over the layer "
     "names (model.layers.{0-1}.self_attn.q_proj, model.layers.{0-1}.self_attn.k_proj"),
    (['{match:"*.mlp.*",dtype:int8}', '{match:"*.mlp.down_proj",dtype:int4}'],
     "quant.rules[1].match=*.mlp.down_proj: every layer it matches is taken by an earlier rule (first match wins)"),
    (['{match:"lm_head",dtype:int8}'], "quant.rules[0].match=lm_head: matches no quantizable layer"),
    (['{match:"*",dtype:int5}'], "quant.rules[0].dtype=int5: invalid value; allowed: a conf/dtype name (bf16, fp16,"),
    (['{match:"*",dtype:{name:x,format:int4,granularity:per_group,group_size:100}}'],
     "quant.rules[0].dtype.group_size=100: invalid value; allowed for int4: 16, 32, 64, 128, 256, 512"),
    (['{match:"*",dtype:{name:x,format:int4,colour:red}}'], "quant.rules[0].dtype.colour=?: not a dtype setting"),
    (['{match:"*",dtype:int8,method:awq}'], "quant.rules[0].method=awq: invalid value; allowed: null, rtn, gptq"),
    (['{match:"*",dtype:{name:x,format:int4,rounding:stochastic},method:gptq}'],
     "quant.rules[0].dtype.rounding=stochastic: invalid value; allowed with method=gptq: nearest"),
])
def test_a_rule_that_takes_no_layer_or_does_not_fit_is_refused_before_submission(rules, message):
    with pytest.raises(ConfigError) as info:
        trial_spec(compose("dtype=int4", _rules(*rules)), [])
    assert str(info.value).startswith(message), str(info.value)


def test_a_rules_format_must_take_the_schemes_static_activation_scales():
    with pytest.raises(ConfigError, match=r"^quant.activation_scales=static: invalid value; allowed for mxfp4 "
                                          r"\(quant.rules\[0\].dtype\): dynamic"):
        trial_spec(compose("dtype=int8", "quant=w_a_static", _rules('{match:"*.mlp.*",dtype:mxfp4}')), [])


def test_the_plan_prints_each_cells_device_time_and_the_sweeps_gpu_hours(tmp_path, capsys):
    import json

    from jobs.perf_model import ModelShape, device_seconds
    from orchestrator import accelerators, plan

    config = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "model_type": "llama"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cells = [("model=llama-3.1-8b", "model.source=path", f"model.path={tmp_path}", f"dtype={d}", "resources.num_gpus=1",
              "resources.accelerator_type=H200") for d in ("bf16", "int4")]
    trials = [plan.planned_trial(compose(*c), c) for c in cells]
    plan.print_plan(trials)
    out = capsys.readouterr().out
    seconds = [device_seconds(t.spec.settings, ModelShape.from_config(config), accelerators.by_name("H200").peaks())
               for t in trials]
    assert seconds[1] < seconds[0]  # int4 weights move a quarter of the bytes at decode
    for s in seconds:
        assert f"~{s:.3g} s on H200-SXM" in out
    assert f"predicted device time: {sum(seconds) / 3600:.3g} GPU-hours for 2 cells" in out


def test_a_key_no_schema_has_is_refused_however_many_cells_were_planned_before():
    trial_spec(compose("dtype=int4"), [])  # a plain cell's checks are kept for the next
    with pytest.raises(ConfigError, match=r"bench.extra=1: unknown key; allowed keys under bench: "):
        trial_spec(compose("dtype=int4", "++bench.extra=1"), [])
