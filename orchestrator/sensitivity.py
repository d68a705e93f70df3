"""Sensitivity sweeps: which layers can take a narrow format, measured one layer group at a time.

``sweep.sensitivity.groups=layer|sublayer|block`` turns every cell of a sweep into
- its baseline: the cell as given (its dtype is what the layers not probed stay at);
- a probe per layer group and candidate dtype (``sweep.sensitivity.dtypes``): the cell with one rule,
  ``quant.rules=[{match: <the group's glob>, dtype: <candidate>}]``;
- a uniform point per candidate: every layer at it (``match: "*"``), against which a recipe is judged.

They are ordinary trials (keys, reuse, resubmit), expanded before validation from the model's layer
names, which come from its config alone (``plan.quantizable_layers``: a meta-device build). The sweep's
report reads them back (:func:`families`): a probe's sensitivity is its KL divergence minus its
baseline's, with the standard error of the per-window differences (both score the same windows).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Optional, Sequence

from orchestrator.errors import ConfigError
from orchestrator.pairing import Row, method_label

UNIFORM = "*"  # the glob of a uniform point: every quantizable layer


def groups(names: Sequence[str], by: str) -> list[tuple[str, str]]:
    """(label, glob) of each layer group in model order: ``layer`` each linear; ``block`` each decoder
    block (the name up to its block index: ``model.layers.3``); ``sublayer`` each block's attention and
    MLP (``model.layers.3.mlp``). A layer outside the indexed blocks (an unskipped lm_head) is a group of
    its own. Each glob matches its group's layers and no other."""
    from orchestrator import plan

    found: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        at = plan.block_index_at(parts)
        depth = None if at is None or by == "layer" else at + 1 if by == "block" else at + 2
        if depth is None or depth >= len(parts):
            found.setdefault(name, name)
        else:
            label = ".".join(parts[:depth])
            found.setdefault(label, f"{label}.*")
    return list(found.items())


def expand(cells: Sequence[dict], overrides: Sequence[Sequence[str]]) -> tuple[list[dict], list[tuple[str, ...]]]:
    """Each cell (resolved plain config) of a sensitivity sweep as its baseline, uniform points and probes
    (each with an override ``probe=<group>:<dtype>`` naming it); other cells as they are. ConfigError for
    bad input."""
    from orchestrator import plan

    out_cells, out_overrides = [], []
    for cell, given in zip(map(plan.plain_config, cells), overrides):
        out_cells.append(cell)
        out_overrides.append(tuple(given))
        settings = cell["sweep"]["sensitivity"]
        if settings["groups"] == "none":
            continue
        if cell["quant"]["rules"]:
            raise ConfigError("quant.rules", cell["quant"]["rules"][0]["match"],
                              f"allowed with sweep.sensitivity.groups={settings['groups']}: none (the sweep sets each "
                              "probe's rule)")
        if not settings["dtypes"]:
            raise ConfigError("sweep.sensitivity.dtypes", [], "allowed: one or more conf/dtype names")
        for name in settings["dtypes"]:
            plan.dtype_settings(name, "sweep.sensitivity.dtypes")
        layer_groups = [("all", UNIFORM)] + groups(plan.quantizable_layers(cell), settings["groups"])
        for dtype in settings["dtypes"]:
            for label, glob in layer_groups:
                rule = {"match": glob, "dtype": dtype, "method": None}
                out_cells.append({**cell, "quant": {**cell["quant"], "rules": [rule]}})
                out_overrides.append((*given, f"probe={label}:{dtype}"))
    return out_cells, out_overrides


# ---- reading a finished sweep back -------------------------------------------------------------

@dataclass
class Family:
    """A baseline and the probes and uniform points made from it: the same params but the rules and the
    method (a plain-cast baseline has none), by one method."""
    base: Row
    method: str = "rtn"
    probes: dict[tuple[str, str], Row] = field(default_factory=dict)  # (group glob, dtype name) -> trial
    uniform: dict[str, Row] = field(default_factory=dict)  # dtype name -> trial

    @property
    def groups(self) -> list[str]:
        return sorted({g for g, _ in self.probes}, key=_natural)

    @property
    def dtypes(self) -> list[str]:
        return sorted({d for _, d in self.probes} | set(self.uniform))

    @property
    def name(self) -> str:
        """``model/dtype`` of the baseline, and the probes' method where it is not rtn."""
        parts = [self.base.params.get("model.name", "?"), self.base.params.get("dtype.name", "?")]
        return "/".join(parts + ([self.method] if self.method != "rtn" else []))


def single_rule(params: dict[str, str]) -> Optional[tuple[str, str]]:
    """(glob, dtype name) of a trial with exactly one rule, from its stored ``quant.rules`` param (untrusted:
    anything but that exact shape is None)."""
    try:
        rules = json.loads(params.get("quant.rules", "[]"))
    except ValueError:
        return None
    if not (isinstance(rules, list) and len(rules) == 1 and isinstance(rules[0], dict)):
        return None
    glob, dtype = rules[0].get("match"), rules[0].get("dtype")
    name = dtype.get("name") if isinstance(dtype, dict) else None
    if isinstance(glob, str) and isinstance(name, str) and 0 < len(glob) <= 500 and 0 < len(name) <= 100:
        return glob, name
    return None


def families(rows: Sequence[Row]) -> list[Family]:
    """The sensitivity families among a sweep's rows: each baseline (a trial without rules) with the
    single-rule trials that share all its params but the rules, method and calibration, per method."""
    def rest(row: Row) -> tuple:
        return tuple(sorted((k, v) for k, v in row.params.items()
                            if k != "quant.rules" and not k.startswith(("method.", "calib."))))

    bases = {rest(r): r for r in rows if r.params.get("quant.rules", "[]") == "[]"}
    found: dict[tuple, Family] = {}
    for row in rows:
        base, rule = bases.get(rest(row)), single_rule(row.params)
        if base is None or rule is None:
            continue
        method = method_label(row.params)
        family = found.setdefault((rest(row), method), Family(base, method))
        glob, dtype = rule
        if glob == UNIFORM:
            family.uniform[dtype] = row
        else:
            family.probes[(glob, dtype)] = row
    return [f for f in found.values() if f.probes]


def increase(row: Row, base: Row, metric: str = "kl_divergence") -> tuple[float, float]:
    """``metric`` of ``row`` minus its baseline's, and the standard error of that difference from the
    per-window values both scored (NaN without them); (NaN, NaN) unless both finished with the metric."""
    if row.status != "FINISHED" or base.status != "FINISHED" or metric not in row.metrics \
            or metric not in base.metrics:
        return math.nan, math.nan
    a, b = row.windows.get(metric, []), base.windows.get(metric, [])
    stderr = statistics.stdev([x - y for x, y in zip(a, b)]) / math.sqrt(len(a)) if len(a) == len(b) > 1 else math.nan
    return row.metrics[metric] - base.metrics[metric], stderr


SENSITIVITY_COLUMNS = ("baseline", "group", "dtype", "kl_divergence", "kl_divergence_stderr", "kl_increase",
                       "kl_increase_stderr", "layer_sqnr_db_min", "layer_output_error_mean", "status", "run_id")


def table(family: Family) -> list[dict]:
    """One row per probe and uniform point of ``family``: its KL, its increase over the baseline (paired
    standard error), and the probed layers' weight SQNR and (where calibrated) output error."""
    out = []
    for (group, dtype), row in [*sorted(family.probes.items(), key=lambda p: (_natural(p[0][0]), p[0][1])),
                                *((("all", d), r) for d, r in sorted(family.uniform.items()))]:
        delta, stderr = increase(row, family.base)
        out.append({"baseline": family.name, "group": group, "dtype": dtype,
                    "kl_divergence": row.metrics.get("kl_divergence"),
                    "kl_divergence_stderr": row.metrics.get("kl_divergence_stderr"),
                    "kl_increase": delta, "kl_increase_stderr": stderr,
                    "layer_sqnr_db_min": row.metrics.get("layer_sqnr_db_min"),
                    "layer_output_error_mean": row.metrics.get("layer_output_error_mean"),
                    "status": row.status, "run_id": row.run_id})
    return out


def _natural(text: str) -> tuple:
    """Sort key with numbers compared as numbers (layers.2 before layers.10)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in text.replace("*", "").split("."))
