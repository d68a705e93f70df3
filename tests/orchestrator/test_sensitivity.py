"""Sensitivity sweeps: layer groups from names, a cell expanded into probes, results read back."""

import json
import math
import statistics

import pytest

from orchestrator import plan, sensitivity
from orchestrator.errors import ConfigError
from orchestrator.pairing import Row
from tests.helpers import compose

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.up_proj",
         "model.layers.0.mlp.down_proj", "model.layers.10.mlp.down_proj", "model.layers.1.fc1", "lm_head"]


@pytest.mark.parametrize("by,expected", [
    ("layer", [(n, n) for n in NAMES]),
    ("sublayer", [("model.layers.0.self_attn", "model.layers.0.self_attn.*"),
                  ("model.layers.0.mlp", "model.layers.0.mlp.*"), ("model.layers.10.mlp", "model.layers.10.mlp.*"),
                  ("model.layers.1.fc1", "model.layers.1.fc1"), ("lm_head", "lm_head")]),
    ("block", [("model.layers.0", "model.layers.0.*"), ("model.layers.10", "model.layers.10.*"),
               ("model.layers.1", "model.layers.1.*"), ("lm_head", "lm_head")]),
])
def test_layer_groups_follow_the_block_index_and_each_glob_matches_its_group_only(by, expected):
    import fnmatch

    found = sensitivity.groups(NAMES, by)
    assert found == expected
    for name in NAMES:  # the groups partition the layers: model.layers.1.* does not take model.layers.10.*
        assert sum(fnmatch.fnmatchcase(name, glob) for _, glob in found) == 1, name


def test_a_sensitivity_cell_becomes_its_baseline_the_uniform_points_and_a_probe_per_group_and_dtype():
    given = ["sweep.sensitivity.groups=block", "sweep.sensitivity.dtypes=[int4,nvfp4]"]
    cells, overrides = sensitivity.expand([compose(*given)], [given])
    assert len(cells) == 1 + 2 * (1 + 2)  # two blocks of the tiny model; lm_head is skipped
    probes = [o[-1] for o in overrides[1:]]
    assert probes == ["probe=all:int4", "probe=model.layers.0:int4", "probe=model.layers.1:int4",
                      "probe=all:nvfp4", "probe=model.layers.0:nvfp4", "probe=model.layers.1:nvfp4"]
    trials = [plan.planned_trial(c, o) for c, o in zip(cells, overrides)]
    assert len({t.spec.trial_key for t in trials}) == len(trials)
    assert [t.baseline for t in trials] == [True] + [False] * 6  # a probe keeps bf16, but is not the baseline
    rules = trials[2].spec.config["quant"]["rules"]
    assert [(r["match"], r["dtype"]["format"]) for r in rules] == [("model.layers.0.*", "int4")]
    assert trials[0].spec.config["quant"].get("rules", []) == []
    assert sensitivity.expand([compose()], [[]])[0] == [compose()]  # groups=none: as it was


@pytest.mark.parametrize("overrides,message", [
    (["sweep.sensitivity.dtypes=[int4,int5]"], "sweep.sensitivity.dtypes=int5: invalid value; allowed: a conf/dtype"),
    (["sweep.sensitivity.dtypes=[]"], "sweep.sensitivity.dtypes=[]: invalid value; allowed: one or more"),
    (['quant.rules=[{match:"*",dtype:int8}]'], "quant.rules=*: invalid value; allowed with sweep.sensitivity.groups"),
])
def test_a_sensitivity_sweep_with_bad_candidates_or_its_own_rules_is_refused(overrides, message):
    cell = compose("sweep.sensitivity.groups=layer", *overrides)
    with pytest.raises(ConfigError) as info:
        sensitivity.expand([cell], [overrides])
    assert str(info.value).startswith(message), str(info.value)


def _row(key, rules, kl_windows, status="FINISHED", method="rtn"):
    params = {"model.name": "tiny", "dtype.name": "bf16", "method.name": method,
              "quant.rules": json.dumps([{"match": g, "dtype": {"name": d}} for g, d in rules])}
    metrics = {"kl_divergence": statistics.fmean(kl_windows)} if status == "FINISHED" else {}
    row = Row(key, f"run-{key}", "", status, params, metrics)
    row.windows = {"kl_divergence": list(kl_windows)}
    return row


def test_a_probes_sensitivity_is_its_kl_increase_with_the_paired_standard_error():
    base_windows = [0.01 * (1 + math.sin(i)) for i in range(8)]
    probe_windows = [v + 0.002 + 0.0001 * math.cos(i) for i, v in enumerate(base_windows)]
    base = _row("b", [], base_windows)
    rows = [base, _row("p", [("model.layers.0.*", "int4")], probe_windows),
            _row("u", [("*", "int4")], [v + 0.01 for v in base_windows]),
            _row("g", [("model.layers.0.*", "int4")], probe_windows, method="gptq"),
            _row("f", [("model.layers.1.*", "int4")], [], status="FAILED"),
            _row("x", [("a", "int4"), ("b", "int8")], probe_windows)]  # two rules: not a probe
    families = sensitivity.families(rows)
    assert [(f.name, f.base.key, sorted(f.probes)) for f in families] == [
        ("tiny/bf16", "b", [("model.layers.0.*", "int4"), ("model.layers.1.*", "int4")]),
        ("tiny/bf16/gptq", "b", [("model.layers.0.*", "int4")])]
    table = sensitivity.table(families[0])
    assert [(line["group"], line["dtype"]) for line in table] == [
        ("model.layers.0.*", "int4"), ("model.layers.1.*", "int4"), ("all", "int4")]
    delta, stderr = table[0]["kl_increase"], table[0]["kl_increase_stderr"]
    differences = [p - b for p, b in zip(probe_windows, base_windows)]
    assert delta == pytest.approx(0.002, abs=1e-4)
    assert stderr == pytest.approx(statistics.stdev(differences) / math.sqrt(8))
    assert stderr < 0.1 * statistics.stdev(probe_windows) / math.sqrt(8)  # paired: the windows' spread cancels
    assert math.isnan(table[1]["kl_increase"]) and table[1]["status"] == "FAILED"


def test_a_stored_rules_param_that_is_not_one_plain_rule_is_not_a_probe():
    for text in ("not json", "[]", '[{"match": 3, "dtype": {"name": "int4"}}]', '[{"match": "*", "dtype": "int4"}]',
                 '{"match": "*"}'):
        assert sensitivity.single_rule({"quant.rules": text}) is None
    assert sensitivity.single_rule({"quant.rules": '[{"match": "m.*", "dtype": {"name": "int4"}}]'}) == ("m.*", "int4")
