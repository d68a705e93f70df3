"""Recipes: the exact bits-budget solve, what is read back from the store, and the whole road from a
sensitivity sweep to a recipe run beside the uniform configurations."""

import csv
import io
import itertools
import json
import random
from fractions import Fraction

import pytest

from orchestrator import recipe
from orchestrator.errors import ConfigError
from tests.helpers import SUMMARY, sweep_runs


def _brute_force(costs, weights, capacity):
    """The least summed cost of every combination within ``capacity`` (None if none fits)."""
    picks = itertools.product(*(range(len(c)) for c in costs))
    feasible = [(sum(c[i] for c, i in zip(costs, pick)), pick) for pick in picks
                if sum(w[i] for w, i in zip(weights, pick)) <= capacity]
    return min(feasible)[0] if feasible else None


def test_the_solve_is_exact_against_every_combination_and_never_over_budget():
    rng = random.Random(0)
    for _ in range(40):
        groups = rng.randint(1, 6)
        costs = [[0.0] + [rng.uniform(-0.1, 1) for _ in range(rng.randint(0, 3))] for _ in range(groups)]
        weights = [[rng.randint(1, 1000) for _ in c] for c in costs]
        capacity = rng.randint(sum(map(min, weights)), sum(map(max, weights)))
        picked = recipe.solve(costs, weights, capacity)
        assert sum(w[i] for w, i in zip(weights, picked)) <= capacity
        assert sum(c[i] for c, i in zip(costs, picked)) == pytest.approx(_brute_force(costs, weights, capacity))
    with pytest.raises(ValueError):
        recipe.solve([[0.0, 1.0]], [[10, 5]], 4)


def test_the_solve_finds_the_combination_a_greedy_walk_down_kl_per_bit_misses():
    # Two groups at 16, 8 or 4 bits per element (1,000 elements each), at most 10 bits per element on average.
    costs = [[0.0, 0.09, 0.10], [0.0, 0.001, 0.5]]
    weights = [[16_000, 8_000, 4_000], [16_000, 8_000, 4_000]]
    greedy, exact = recipe.greedy(costs, weights, 20_000), recipe.solve(costs, weights, 20_000)
    cost = lambda pick: sum(c[i] for c, i in zip(costs, pick))  # noqa: E731
    assert exact == [1, 1] and cost(exact) == pytest.approx(0.091)
    assert greedy == [2, 1] and cost(greedy) == pytest.approx(0.101)  # it took group 0 to 4 bits for a cheap bit


def test_stored_layer_tables_and_recipe_tags_are_checked_as_input():
    assert recipe.parse_layers("layer,shape,format,bytes\nm.a,4x8,int4,20\n") == {"m.a": (32, 20)}
    for text in ("layer,shape\nm.a,4x8\n", "layer,shape,bytes\nm.a,4x8,-1\n", "layer,shape,bytes\nm a,4x8,1\n",
                 "layer,shape,bytes\nm.a,4x8,1\nm.a,4x8,1\n"):
        with pytest.raises(ValueError):
            recipe.parse_layers(text)
    note = {"name": "r", "source": "swp-abc123", "budget_bits": 4.5, "bits": 4.4, "predicted_kl": 0.01,
            "predicted_kl_stderr": 0.001, "uniform": [{"dtype": "int4", "bits": 4.25, "kl_divergence": 0.02,
                                                       "kl_divergence_stderr": 0.002}]}
    assert recipe.stored_note({"recipe": json.dumps(note)}) == note
    assert recipe.stored_note({}) is None
    for bad in ({**note, "bits": "${oc.env:HOME}"}, {**note, "name": "a b"}, {**note, "uniform": [{"dtype": "x"}]},
                {**note, "predicted_kl": float("nan")}):
        with pytest.raises(ConfigError, match="recipe tag of the sweep"):
            recipe.stored_note({"recipe": json.dumps(bad)})


def _artifact(client, run_id, name, tmp_path):
    return open(client.download_artifacts(run_id, name, str(tmp_path / run_id))).read()


@pytest.mark.slow
def test_a_sensitivity_sweep_gives_a_recipe_within_budget_that_runs_beside_the_uniform_configurations(
        run_cli, tmp_path, tiny_model_cfg):
    proc = run_cli("run", "-m", "sweep.sensitivity.groups=block", "sweep.sensitivity.dtypes=[int4,int8]", "debug=fast",
                   "eval.max_tokens=512", "sweep.name=sens")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = SUMMARY.search(proc.stdout)
    assert summary.groups()[1:3] == ("7", "7"), proc.stdout  # baseline, 2 uniform points, 2 blocks x 2 dtypes
    sweep_id = summary.group(1)
    client, parents, _ = sweep_runs(tmp_path / "mlflow.db")
    parent = parents[0]
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/sensitivity.csv", "report/sensitivity_tiny-llama_bf16.png"} <= report
    table = list(csv.DictReader(io.StringIO(_artifact(client, parent.info.run_id, "report/sensitivity.csv", tmp_path))))
    assert [(r["group"], r["dtype"]) for r in table] == [
        ("model.layers.0.*", "int4"), ("model.layers.0.*", "int8"), ("model.layers.1.*", "int4"),
        ("model.layers.1.*", "int8"), ("all", "int4"), ("all", "int8")]
    increase = {(r["group"], r["dtype"]): float(r["kl_increase"]) for r in table}
    blocks = ("model.layers.0.*", "model.layers.1.*")
    assert increase[("all", "int4")] > max(increase[(block, "int4")] for block in blocks)
    assert all(float(r["kl_increase_stderr"]) > 0 for r in table)

    proc = run_cli("recipe", sweep_id, "--budget-bits", "4")  # below every layer at int4: nothing written
    assert proc.returncode == 2 and "--budget-bits=4.0: cannot be met; allowed: >= 4.2500" in proc.stderr, proc.stderr
    assert not (tmp_path / "recipes").exists()
    # A budget between int4 (4.25 bits) and int8 (8.1): one block at int8 at most.
    proc = run_cli("recipe", sweep_id, "--budget-bits", "6.5", "--out", "recipes")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run it:  orchestrator run -cd recipes experiment={sweep_id}-6.5bits" in proc.stdout
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "recipes")}
    assert logged == {f"recipes/{sweep_id}-6.5bits.yaml", f"recipes/{sweep_id}-6.5bits.json"}
    choices = json.loads(_artifact(client, parent.info.run_id, f"recipes/{sweep_id}-6.5bits.json", tmp_path))
    assert sorted(c["dtype"] for c in choices["choices"]) == ["int4", "int8"]  # the int8 block is the more sensitive
    sensitive = max(blocks, key=lambda block: increase[(block, "int4")] - increase[(block, "int8")])
    assert {c["group"]: c["dtype"] for c in choices["choices"]}[sensitive] == "int8"

    proc = run_cli("run", "-cd", "recipes", f"experiment={sweep_id}-6.5bits")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"recipe {sweep_id}-6.5bits: predicted:" in proc.stdout  # beside the table, at the sweep's end
    runs = client.search_runs([parent.info.experiment_id])
    trial = next(r for r in runs if r.data.tags.get("kind") == "trial" and r.data.tags["sweep_id"] != sweep_id)
    layers = list(csv.DictReader(io.StringIO(_artifact(client, trial.info.run_id, "layers.csv", tmp_path))))
    assert len(layers) == 14 and all(r["rule"] != "trial" for r in layers)  # every layer took a rule
    elements = sum(int(a) * int(b) for a, b in (r["shape"].split("x") for r in layers))
    bits = Fraction(sum(8 * int(r["bytes"]) for r in layers), elements)
    assert bits <= Fraction("6.5") and float(bits) == pytest.approx(choices["bits"], rel=1e-12)
    assert trial.data.metrics["bits_per_element"] == pytest.approx(float(bits), rel=1e-12)

    recipe_parent = next(r for r in runs if r.data.tags.get("kind") == "sweep" and r.data.tags["sweep_id"] != sweep_id)
    text = _artifact(client, recipe_parent.info.run_id, "report/recipe.csv", tmp_path)
    lines = list(csv.DictReader(io.StringIO(text)))
    assert [line["configuration"].split(" (")[0] for line in lines] == [
        f"recipe {sweep_id}-6.5bits: predicted", f"recipe {sweep_id}-6.5bits: measured", "uniform int4",
        "uniform int8", "uniform bf16"]
    predicted, measured = (float(line["kl_divergence"]) for line in lines[:2])
    stderr = float(lines[0]["kl_divergence_stderr"])
    assert abs(measured - predicted) < 5 * stderr + 0.2 * predicted  # the additive model holds on the tiny model
    assert float(lines[2]["kl_divergence"]) > measured  # uniform int4 at fewer bits is worse
