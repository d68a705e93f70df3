"""A mixed-precision recipe from a finished sensitivity sweep: ``orchestrator recipe ID --budget-bits B``.

Each layer group of the sweep (orchestrator/sensitivity.py) takes one of its candidate dtypes or stays
at the baseline's, so that the summed KL increase the probes measured is least while the bits per weight
over every quantizable layer stay within the budget. The model is additive: a recipe's KL is predicted
as the baseline's plus each chosen group's increase, per eval window (so its standard error is that of
the per-window sum); the recipe's own trial measures how far that holds.

The solve is exact: a multiple-choice knapsack (one option per group, one budget) as a 0/1 integer
program, by HiGHS through ``scipy.optimize.milp``. At a few hundred groups and a handful of dtypes it
takes milliseconds, and a greedy walk down marginal KL per bit can stop short of the best use of the
budget (it cannot undo a choice). The budget is checked in exact integer arithmetic on the layers' stored
bytes, the numbers the trial will log.

Bits come from the uniform points' ``layers.csv`` (every layer at each candidate, with its bytes and
shape) and, for a baseline that is a plain cast, from the compute dtype's width. Everything read from the
store is checked as untrusted input. The recipe is written as an experiment file (``# @package _global_``)
holding the baseline's stored config with one rule per group, and logged under ``recipes/`` on the sweep's
parent run; ``sweep.recipe`` in it carries the prediction, which that run's report holds against the
measurement and the uniform points.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

from jobs.spec import EVAL_WINDOWS_FILE
from orchestrator import sensitivity, store
from orchestrator.errors import ConfigError
from orchestrator.pairing import MAX_FILE_BYTES, Row

LAYERS_FILE = "layers.csv"
LAYER_NAME = re.compile(r"[A-Za-z0-9_.]{1,300}")
SHAPE = re.compile(r"([0-9]{1,9})x([0-9]{1,9})")
COUNT = re.compile(r"[0-9]{1,15}")
NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
WIDTH_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}
MAX_GROUPS = 100_000


@dataclass
class Option:
    """One way to store a group: a candidate dtype (its probe) or the baseline's (``probe`` None)."""
    dtype: str
    bits: int  # the group's weights in bits, scales included
    increase: float = 0.0  # the KL increase its probe measured
    probe: Optional[Row] = None
    settings: Optional[dict] = None  # the rule's dtype settings


@dataclass
class Recipe:
    name: str
    source: str  # the sensitivity sweep's id
    family: sensitivity.Family
    budget_bits: float
    groups: list[tuple[str, Option]]  # (glob, chosen option), in model order
    elements: int  # weight elements of every quantizable layer
    total_bits: int
    predicted_kl: float
    predicted_kl_stderr: float
    uniform: list[dict] = field(default_factory=list)  # the baseline and the uniform points, measured
    family_elements: dict[str, int] = field(default_factory=dict)  # group glob -> its weight elements
    base_config: dict = field(default_factory=dict)  # the baseline trial's stored config, checked

    @property
    def bits(self) -> float:
        return self.total_bits / self.elements

    def rules(self) -> list[dict]:
        return [{"match": glob, "dtype": option.settings} for glob, option in self.groups]

    def note(self) -> dict:
        """``sweep.recipe``: what the recipe's own sweep report compares its measurement with."""
        return {"name": self.name, "source": self.source, "budget_bits": self.budget_bits, "bits": self.bits,
                "predicted_kl": self.predicted_kl, "predicted_kl_stderr": self.predicted_kl_stderr,
                "uniform": self.uniform}

    def choices(self) -> list[dict]:
        return [{"group": glob, "dtype": o.dtype, "bits_per_weight": o.bits / self.family_elements[glob],
                 "kl_increase": o.increase} for glob, o in self.groups]


def parse_layers(text: str) -> dict[str, tuple[int, int]]:
    """A trial's ``layers.csv`` as layer name -> (weight elements, bytes), checked as untrusted input."""
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"layer", "shape", "bytes"} <= set(reader.fieldnames):
        raise ValueError(f"{LAYERS_FILE}: the columns layer, shape and bytes are missing")
    out = {}
    for row in reader:
        name, shape, size = row.get("layer") or "", SHAPE.fullmatch(row.get("shape") or ""), row.get("bytes") or ""
        if not LAYER_NAME.fullmatch(name) or shape is None or not COUNT.fullmatch(size) or name in out:
            raise ValueError(f"{LAYERS_FILE}: a row is malformed ({name[:50]!r})")
        out[name] = (int(shape[1]) * int(shape[2]), int(size))
        if len(out) > MAX_GROUPS:
            raise ValueError(f"{LAYERS_FILE}: more than {MAX_GROUPS} layers")
    return out


def solve(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[int]], capacity: int) -> list[int]:
    """The option per group (an index into each group's lists) that minimises the summed cost with the
    summed weight at most ``capacity``, exactly (0/1 program; HiGHS). ValueError if none fits."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(c) for c in costs]
    if sum(min(w) for w in weights) > capacity:
        raise ValueError("infeasible")
    scale = max(max(w) for w in weights) * len(weights)  # weights as fractions of the total: well conditioned
    c = np.array([x for group in costs for x in group], dtype=float)
    w = np.array([x for group in weights for x in group], dtype=float) / scale
    one = np.zeros((len(sizes), len(c)))
    start = 0
    for g, n in enumerate(sizes):
        one[g, start:start + n] = 1
        start += n
    limit = capacity
    for _ in range(5):  # the solver's tolerance may overshoot by a hair: tighten and solve again
        result = milp(c, integrality=np.ones(len(c)), bounds=Bounds(0, 1),
                      constraints=[LinearConstraint(one, 1, 1), LinearConstraint(w[None, :], -np.inf, limit / scale)])
        if result.x is None:
            raise ValueError("infeasible")
        picked, start = [], 0
        for n in sizes:
            picked.append(int(np.argmax(result.x[start:start + n])))
            start += n
        used = sum(weights[g][i] for g, i in enumerate(picked))
        if used <= capacity:
            return picked
        limit -= used - capacity
    raise ValueError("the solver's answer exceeds the budget")


def greedy(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[int]], capacity: int) -> list[int]:
    """What the exact solve is held against (tests, benchmarks/recipes.py): every group at its widest
    option, then the step with the least cost per weight saved, until within ``capacity``."""
    pick = [max(range(len(w)), key=w.__getitem__) for w in weights]
    while sum(w[i] for w, i in zip(weights, pick)) > capacity:
        steps = [((costs[g][j] - costs[g][pick[g]]) / (weights[g][pick[g]] - weights[g][j]), g, j)
                 for g in range(len(costs)) for j in range(len(costs[g])) if weights[g][j] < weights[g][pick[g]]]
        if not steps:
            raise ValueError("infeasible")
        _, g, j = min(steps)
        pick[g] = j
    return pick


def _rule_settings(row: Row) -> dict:
    """The resolved dtype settings of a single-rule trial, from its ``quant.rules`` param (untrusted)."""
    from jobs.config import DtypeConfig
    from orchestrator import plan, schema

    try:
        settings = json.loads(row.params["quant.rules"])[0]["dtype"]
        typed = plan.build_schema(DtypeConfig, settings, "dtype.")
        schema.validate({**settings, "compute_dtype": "auto"}, DtypeConfig, "dtype.")
    except (ValueError, KeyError, TypeError, IndexError, ConfigError) as e:
        raise ConfigError(f"quant.rules param of run {row.run_id}", "?", "the settings this project stores",
                          problem=f"stored param is malformed ({str(e)[:100]})") from None
    return {k: getattr(typed, k) for k in settings}


def make(client, parent, rows: list[Row], budget_bits: float, name: str, family_name: Optional[str]) -> Recipe:
    """The recipe for ``budget_bits`` from the sweep's rows (report.load's, with their windows)."""
    families = sensitivity.families(rows)
    if family_name is not None:  # its name, or its baseline's trial key where names repeat
        families = [f for f in families if family_name in (f.name, f.base.key)]
    if len(families) != 1:
        known = ", ".join(f"{f.name} (baseline {f.base.key})" for f in sensitivity.families(rows)) or "none"
        raise ConfigError("--family", family_name, f"one of the sweep's sensitivity families: {known}",
                          problem="no such family" if family_name else "the sweep has none or several")
    family = families[0]
    base = family.base
    if base.status != "FINISHED":
        raise ConfigError("sweep", parent.data.tags.get("sweep_id"), "a sensitivity sweep whose baseline finished",
                          problem=f"its baseline {base.label} is {base.status}")
    layers: dict[str, dict[str, tuple[int, int]]] = {}
    for dtype, row in family.uniform.items():
        if row.status != "FINISHED":
            continue
        text = store.download_text(client, row.run_id, LAYERS_FILE, MAX_FILE_BYTES)
        if text is not None:
            try:
                layers[dtype] = parse_layers(text)
            except ValueError as e:
                raise ConfigError(f"{LAYERS_FILE} of run {row.run_id}", "?", "the table this project stores",
                                  problem=str(e)) from None
    if not layers:
        raise ConfigError("sweep", parent.data.tags.get("sweep_id"), "a sensitivity sweep with a finished uniform "
                          "point (probe=all:<dtype>), whose layers give each dtype's bits", problem="has none")
    names = next(iter(layers.values()))
    base_bits = _baseline_bits(client, base, names)
    windows = base.windows.get("kl_divergence", [])
    groups, costs, weights, per_group = [], [], [], {}
    for glob in family.groups:
        members = [n for n in names if fnmatch.fnmatchcase(n, glob)]
        if not members:
            continue
        options = [Option(base.params.get("dtype.name", "baseline"), sum(base_bits[n] for n in members))]
        for dtype in family.dtypes:
            probe = family.probes.get((glob, dtype))
            delta, _ = sensitivity.increase(probe, base) if probe else (math.nan, math.nan)
            if dtype in layers and math.isfinite(delta) and all(n in layers[dtype] for n in members):
                options.append(Option(dtype, 8 * sum(layers[dtype][n][1] for n in members), delta, probe,
                                      _rule_settings(probe)))
        groups.append((glob, options))
        per_group[glob] = sum(names[n][0] for n in members)
        costs.append([o.increase for o in options])
        weights.append([o.bits for o in options])
    grouped = {n for glob, _ in groups for n in names if fnmatch.fnmatchcase(n, glob)}
    fixed = sum(base_bits[n] for n in names if n not in grouped)  # layers no probe covered stay at the baseline
    elements = sum(e for e, _ in names.values())
    capacity = math.floor(Fraction(str(budget_bits)) * elements) - fixed
    try:
        picked = solve(costs, weights, capacity)
    except ValueError:
        least = (fixed + sum(min(w) for w in weights)) / elements
        raise ConfigError("--budget-bits", budget_bits, f"allowed: >= {least:.4f} (every group at its narrowest "
                          "candidate)", problem="cannot be met") from None
    chosen = [(glob, options[i]) for (glob, options), i in zip(groups, picked)]
    base_config = _trial_config(client, base)
    base_settings = {k: v for k, v in base_config["dtype"].items() if k != "compute_dtype"}
    for _, option in chosen:
        if option.probe is None:
            option.settings = base_settings
    total = fixed + sum(o.bits for _, o in chosen)
    predicted = base.metrics.get("kl_divergence", math.nan) + sum(o.increase for _, o in chosen)
    per_window = list(windows)
    for _, option in chosen:
        if option.probe is not None:
            probe_windows = option.probe.windows.get("kl_divergence", [])
            if len(probe_windows) != len(windows) or len(windows) < 2:
                raise ConfigError(f"{EVAL_WINDOWS_FILE} of run {option.probe.run_id}", len(probe_windows),
                                  f"the {len(windows)} windows its baseline scored (at least 2)",
                                  problem="the prediction's standard error needs them")
            per_window = [x + p - b for x, p, b in zip(per_window, probe_windows, windows)]
    stderr = statistics.stdev(per_window) / math.sqrt(len(per_window)) if len(per_window) > 1 else 0.0
    uniform = [_point(base.params.get("dtype.name", "baseline"), base, sum(base_bits.values()) / elements)]
    uniform += [_point(d, r, r.metrics.get("bits_per_element", math.nan)) for d, r in sorted(family.uniform.items())
                if r.status == "FINISHED"]
    finite = [u for u in uniform if all(math.isfinite(v) for v in u.values() if isinstance(v, float))]
    return Recipe(name, parent.data.tags.get("sweep_id", ""), family, budget_bits, chosen, elements, total,
                  predicted, stderr, finite, per_group, base_config)


def _point(dtype: str, row: Row, bits: float) -> dict:
    return {"dtype": dtype, "bits": float(bits), "kl_divergence": row.metrics.get("kl_divergence", math.nan),
            "kl_divergence_stderr": row.metrics.get("kl_divergence_stderr", math.nan)}


def _baseline_bits(client, base: Row, names: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Each layer's bits at the baseline: the compute dtype's width for a plain cast, else its layers.csv."""
    if base.params.get("dtype.format") == "None":
        compute = base.params.get("dtype.compute_dtype", "auto")
        width = WIDTH_BITS.get(base.params.get("model.dtype") if compute == "auto" else compute)
        if width is None:
            raise ConfigError("dtype.compute_dtype param of the baseline", compute, ", ".join(WIDTH_BITS))
        return {n: width * e for n, (e, _) in names.items()}
    text = store.download_text(client, base.run_id, LAYERS_FILE, MAX_FILE_BYTES)
    try:
        stored = parse_layers(text or "")
    except ValueError as e:
        raise ConfigError(f"{LAYERS_FILE} of the baseline run {base.run_id}", "?", "the table this project stores",
                          problem=str(e)) from None
    if set(stored) != set(names):
        raise ConfigError(f"{LAYERS_FILE} of the baseline run {base.run_id}", "?", "the uniform points' layers",
                          problem="its layers differ")
    return {n: 8 * b for n, (_, b) in stored.items()}


def _trial_config(client, row: Row) -> dict:
    """A trial's stored config, checked as ``resubmit`` checks one (sections, plain data, its key)."""
    from orchestrator import plan, resubmit

    config = resubmit._check_sections(resubmit._stored_config(client, row.run_id), f"run {row.run_id}")
    if plan.trial_key(config) != row.key:
        raise ConfigError(f"config.yaml of run {row.run_id}", row.key, "the config its key was made of",
                          problem="stored config and key disagree")
    return config


def experiment_yaml(client, recipe: Recipe, sweep_name: str) -> str:
    """The recipe as an experiment file: the baseline's config with one rule per group, the probes' method
    and calibration (a plain-cast baseline keeps neither), and the prediction."""
    import yaml

    from orchestrator import resubmit

    config = dict(recipe.base_config)
    resubmit._ModelSources(set()).check(config["model"], f"the baseline of {recipe.source}")
    config["quant"] = {**config["quant"], "rules": recipe.rules()}
    probe = next((o.probe for _, o in recipe.groups if o.probe is not None), None)
    if probe is not None:  # the groups are rounded as their probes were
        probed = _trial_config(client, probe)
        config["method"] = probed["method"]
        if "calib" in probed:
            config["calib"] = probed["calib"]
    body = {**config, "sweep": {"name": sweep_name, "recipe": recipe.note()}}
    lines = [
        "# @package _global_",
        f"# Recipe {recipe.name}: per layer group, the dtype that least raises the KL divergence measured by the",
        f"# sensitivity sweep {recipe.source} ({recipe.family.name}), within {recipe.budget_bits:g} bits per weight.",
        f"# {recipe.bits:.4f} bits per weight; predicted KL {recipe.predicted_kl:.4g} +- "
        f"{recipe.predicted_kl_stderr:.2g} (the baseline's plus each chosen group's increase).",
        f"# Run it:  orchestrator run -cd <the folder above experiment/> experiment={recipe.name}",
    ]
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False)


def create(client, parent, rows: list[Row], budget_bits: float, out: Path, name: Optional[str],
           family: Optional[str]) -> tuple[Recipe, Path]:
    """Make the recipe from the sweep's rows (``report.load``'s, with their windows), write
    ``out/experiment/<name>.yaml`` and log it (and its choices) under ``recipes/`` on the sweep's parent run."""
    sweep_id = parent.data.tags.get("sweep_id", "")
    if not (math.isfinite(budget_bits) and 0 < budget_bits <= 64):
        raise ConfigError("--budget-bits", budget_bits, "allowed: bits per weight, > 0 and <= 64")
    name = name or f"{sweep_id}-{budget_bits:g}bits"
    if not NAME.fullmatch(name):
        raise ConfigError("--name", name, "allowed: letters, digits, _ . and - (a file name)")
    recipe = make(client, parent, rows, budget_bits, name, family)
    sweep_name = client.get_experiment(parent.info.experiment_id).name
    text = experiment_yaml(client, recipe, sweep_name)
    path = Path(out) / "experiment" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / f"{name}.yaml").write_text(text)
        (Path(tmp) / f"{name}.json").write_text(json.dumps({**recipe.note(), "choices": recipe.choices()}, indent=2))
        client.log_artifacts(parent.info.run_id, tmp, "recipes")
    return recipe, path


def stored_note(tags: dict[str, str]) -> Optional[dict]:
    """A sweep's ``recipe`` tag (what ``sweep.recipe`` said), checked as untrusted input; None if it has none."""
    from orchestrator import schema

    if "recipe" not in tags:
        return None
    try:
        note = json.loads(tags["recipe"])
        schema.validate(note, schema.RecipeNote)  # its uniform points too
        plain = all(isinstance(note[k], str) and NAME.fullmatch(note[k]) for k in ("name", "source")) and all(
            isinstance(p["dtype"], str) and NAME.fullmatch(p["dtype"]) for p in note["uniform"])
        numbers = [note[k] for k in ("budget_bits", "bits", "predicted_kl", "predicted_kl_stderr")] + [
            p[k] for p in note["uniform"] for k in ("bits", "kl_divergence", "kl_divergence_stderr")]
        if not plain or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers):
            raise ValueError("odd values")
    except (ValueError, KeyError, TypeError, ConfigError):
        raise ConfigError("recipe tag of the sweep", tags["recipe"][:100], "the JSON object sweep.recipe holds",
                          problem="stored tag is malformed") from None
    return note


COMPARISON_COLUMNS = ("configuration", "bits_per_weight", "kl_divergence", "kl_divergence_stderr")


def comparison(note: dict, rows: Sequence[Row]) -> list[dict]:
    """The recipe's predicted KL, each of its trials' measured KL, and the uniform points of its sensitivity
    sweep (the baseline's dtype and every candidate), each at its bits per weight."""
    out = [{"configuration": f"recipe {note['name']}: predicted", "bits_per_weight": note["bits"],
            "kl_divergence": note["predicted_kl"], "kl_divergence_stderr": note["predicted_kl_stderr"]}]
    out += [{"configuration": f"recipe {note['name']}: measured ({r.label or r.key})",
             "bits_per_weight": r.metrics.get("bits_per_element", math.nan),
             "kl_divergence": r.metrics.get("kl_divergence", math.nan),
             "kl_divergence_stderr": r.metrics.get("kl_divergence_stderr", math.nan)}
            for r in rows if r.status == "FINISHED" and r.params.get("quant.rules", "[]") != "[]"]
    out += [{"configuration": f"uniform {u['dtype']} (measured in {note['source']})", "bits_per_weight": u["bits"],
             "kl_divergence": u["kl_divergence"], "kl_divergence_stderr": u["kl_divergence_stderr"]}
            for u in sorted(note["uniform"], key=lambda u: u["bits"])]
    return out


def describe(recipe: Recipe) -> list[str]:
    """The lines ``orchestrator recipe`` prints."""
    counts: dict[str, int] = {}
    for _, option in recipe.groups:
        counts[option.dtype] = counts.get(option.dtype, 0) + 1
    out = [f"recipe {recipe.name}: {len(recipe.groups)} groups ({', '.join(f'{n} {d}' for d, n in counts.items())}), "
           f"{recipe.bits:.4f} bits per weight (budget {recipe.budget_bits:g}), predicted KL "
           f"{recipe.predicted_kl:.4g} +- {recipe.predicted_kl_stderr:.2g}"]
    out += [f"  uniform {u['dtype']}: {u['bits']:.4f} bits per weight, KL {u['kl_divergence']:.4g} "
            f"+- {u['kl_divergence_stderr']:.2g}" for u in recipe.uniform]
    return out
