"""Which cell each trial is compared with, and what the comparison says: pure functions of
the trials' params and metrics, no store and no drawing (orchestrator.report does those).

A trial's baseline is the cell of the same sweep with the choices in ``sweep.baseline``
(default dtype=bf16, kernel=torch, backend=hf) and everything else the trial's result depends
on the same: model, bench, eval, seed, device and GPU type (:func:`pair_key`). Against it
each trial gets ``speedup_prefill``, ``speedup_decode``, ``memory_ratio``,
``weight_memory_ratio`` and ``perplexity_delta``. A trial without a baseline says so; it is
never compared with another cell instead.

The trial and its baseline score the same eval windows, so the accuracy deltas are paired:
their standard errors (``nll_delta_stderr``, ``perplexity_delta_stderr``) come from the
per-window differences, not from the two runs' own standard errors (which would count the
windows' shared difficulty twice and call real differences noise). A delta within
``NOISE_Z`` standard errors of zero is marked ``perplexity_delta_within_noise``.

lm-eval task metrics are paired the same way, example by example (``<task>.<metric>_delta`` and
its ``_delta_stderr``), and for a 0/1 score the examples that flipped each way against the
baseline: ``<task>.<metric>_correct_to_wrong`` and ``_wrong_to_correct`` (fractions of the
examples both scored). Equal accuracy can hide many flips (arXiv 2407.09141).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from jobs.spec import EVAL_WINDOW_COLUMNS as WINDOW_COLUMNS
from jobs.spec import EVAL_WINDOWS_FILE, TASK_NAME, TASK_SAMPLE_COLUMNS, TASK_SAMPLES_FILE
from orchestrator import tracking
from orchestrator.errors import ConfigError

# The sections a trial varies against its baseline; everything else must match. A baseline is
# named by the choices of all but calib (which has no name: it goes with the method).
COMPARED_SECTIONS = ("dtype", "quant", "method", "calib", "kernel", "backend")
BASELINE_SECTIONS = tuple(s for s in COMPARED_SECTIONS if s != "calib")
# (metric logged on the trial, the metric it is made of, how: ratio trial/baseline or difference)
DELTAS = (("speedup_prefill", "prefill_tokens_per_s", "ratio"),
          ("speedup_decode", "decode_tokens_per_s", "ratio"),
          ("memory_ratio", "peak_memory_mb", "ratio"),
          ("weight_memory_ratio", "weight_bytes", "ratio"),
          ("perplexity_delta", "perplexity", "difference"))
PAIRED_DELTAS = ("nll_delta", "nll_delta_stderr", "perplexity_delta_stderr", "perplexity_delta_within_noise")
COMPARISON_METRICS = {name for name, _, _ in DELTAS} | set(PAIRED_DELTAS)
COMPARISON_TAGS = {"baseline", "baseline_run_id"}
NOISE_Z = 1.96  # two-sided 95%: a delta closer to zero than this many standard errors is within noise
MAX_WINDOWS = 1_000_000  # of a stored eval_windows.csv, read back as untrusted input
MAX_SAMPLES = 5_000_000  # rows of a stored task_samples.csv
MAX_FILE_BYTES = 256 * 2**20  # of either file
PAIRED_FILES = (EVAL_WINDOWS_FILE, TASK_SAMPLES_FILE)
TASK_DELTA_SUFFIXES = ("_delta", "_delta_stderr", "_correct_to_wrong", "_wrong_to_correct")
_DOC_ID = re.compile(r"[0-9]{1,12}")
_NUMBER = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?")  # what repr(float) writes, finite


def is_comparison_metric(name: str) -> bool:
    """Whether a metric comes from the pairing (so only this report's pairing may set it)."""
    return name in COMPARISON_METRICS or ("." in name and name.endswith(TASK_DELTA_SUFFIXES))

def pair_key(params: dict[str, str]) -> tuple:
    """What a trial and its baseline share: every param outside COMPARED_SECTIONS, and of the
    resources only the GPU model (what is in the trial key)."""
    return tuple(sorted((k, v) for k, v in params.items() if k.split(".", 1)[0] not in COMPARED_SECTIONS
                        and (not k.startswith("resources.") or k == "resources.accelerator_type")))


def is_baseline(params: dict[str, str], baseline: dict[str, str]) -> bool:
    """A trial with the baseline's choices and no per-layer rules (a sensitivity probe keeps the baseline's dtype)."""
    return params.get("quant.rules", "[]") == "[]" and all(
        params.get(f"{section}.name") == str(name) for section, name in baseline.items())


def stored_baseline(tags: dict[str, str]) -> dict[str, str]:
    """The sweep's ``baseline`` tag, checked as untrusted input (ConfigError)."""
    try:
        baseline = json.loads(tags["baseline"])
    except ValueError:
        baseline = None
    if not (isinstance(baseline, dict) and baseline and all(
            k in BASELINE_SECTIONS and isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", v)
            for k, v in baseline.items())):
        raise ConfigError("baseline tag of the sweep", tags["baseline"][:100],
                          f"a JSON object of {', '.join(BASELINE_SECTIONS)} to config names",
                          problem="stored tag is malformed")
    return baseline


def describe(baseline: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in baseline.items())


def measures(config: dict[str, Any]) -> bool:
    """Whether a trial measures anything to compare (backend=noop only exercises the orchestrator)."""
    return config["backend"]["name"] != "noop"


def missing_baselines(configs: Sequence[dict[str, Any]], baseline: dict[str, str]) -> list[int]:
    """Indexes of the trial configs (TrialSpec.config) that have no baseline among ``configs``."""
    flat = [tracking.flatten(c) for c in configs]
    have = {pair_key(p) for p in flat if is_baseline(p, baseline)}
    return [i for i, p in enumerate(flat) if not is_baseline(p, baseline) and pair_key(p) not in have]


def deltas(metrics: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    out = {}
    for name, source, how in DELTAS:
        if source in metrics and source in base:
            if how == "difference":
                out[name] = metrics[source] - base[source]
            elif base[source] > 0:
                out[name] = metrics[source] / base[source]
    return out


def parse_windows(text: str) -> dict[str, list[float]]:
    """A trial's ``eval_windows.csv``, checked as untrusted input (ValueError): the exact columns,
    windows numbered 0, 1, ... and every value a finite number."""
    lines = text.splitlines()
    if not lines or tuple(lines[0].split(",")) != WINDOW_COLUMNS:
        raise ValueError(f"eval_windows.csv: the header must be {','.join(WINDOW_COLUMNS)}")
    if len(lines) - 1 > MAX_WINDOWS:
        raise ValueError(f"eval_windows.csv: more than {MAX_WINDOWS} windows")
    columns: dict[str, list[float]] = {c: [] for c in WINDOW_COLUMNS[1:]}
    for i, line in enumerate(lines[1:]):
        cells = line.split(",")
        if len(cells) != len(WINDOW_COLUMNS) or cells[0] != str(i):
            raise ValueError(f"eval_windows.csv: row {i + 1} is not window {i} with {len(WINDOW_COLUMNS)} cells")
        for column, cell in zip(WINDOW_COLUMNS[1:], cells[1:]):
            value = float(cell) if _NUMBER.fullmatch(cell) else math.nan
            if not math.isfinite(value):
                raise ValueError(f"eval_windows.csv: window {i} {column}={cell[:40]!r} is not a finite number")
            columns[column].append(value)
    return columns


def parse_samples(text: str) -> dict[tuple[str, str], dict[int, float]]:
    """A trial's ``task_samples.csv`` as {(task, metric): {doc_id: value}}, checked as untrusted
    input (ValueError): the exact columns, plain names, integer ids, finite values, no repeats."""
    lines = text.splitlines()
    if not lines or tuple(lines[0].split(",")) != TASK_SAMPLE_COLUMNS:
        raise ValueError(f"task_samples.csv: the header must be {','.join(TASK_SAMPLE_COLUMNS)}")
    if len(lines) - 1 > MAX_SAMPLES:
        raise ValueError(f"task_samples.csv: more than {MAX_SAMPLES} rows")
    out: dict[tuple[str, str], dict[int, float]] = {}
    for i, line in enumerate(lines[1:], start=2):
        cells = line.split(",")
        if len(cells) != 4 or not (TASK_NAME.fullmatch(cells[0]) and TASK_NAME.fullmatch(cells[2])
                                   and _DOC_ID.fullmatch(cells[1]) and _NUMBER.fullmatch(cells[3])):
            raise ValueError(f"task_samples.csv: line {i} is not task,doc_id,metric,value")
        value = float(cells[3])
        scores = out.setdefault((cells[0], cells[2]), {})
        if not math.isfinite(value) or int(cells[1]) in scores:
            raise ValueError(f"task_samples.csv: line {i}: a repeated example or a value that is not finite")
        scores[int(cells[1])] = value
    return out


def task_deltas(samples: dict[tuple[str, str], dict[int, float]],
                base: dict[tuple[str, str], dict[int, float]]) -> dict[str, float]:
    """Each task metric's paired delta against the baseline over the examples both scored, and
    for 0/1 scores the fraction that flipped each way."""
    out = {}
    for (task, metric), scores in samples.items():
        theirs = base.get((task, metric), {})
        both = sorted(scores.keys() & theirs.keys())
        if not both:
            continue
        name = f"{task}.{metric}"
        differences = [scores[d] - theirs[d] for d in both]
        out[f"{name}_delta"] = statistics.fmean(differences)
        if len(both) > 1:
            out[f"{name}_delta_stderr"] = statistics.stdev(differences) / math.sqrt(len(both))
        if {scores[d] for d in both} | {theirs[d] for d in both} <= {0.0, 1.0}:
            out[f"{name}_correct_to_wrong"] = sum(theirs[d] > scores[d] for d in both) / len(both)
            out[f"{name}_wrong_to_correct"] = sum(theirs[d] < scores[d] for d in both) / len(both)
    return out


def paired_deltas(windows: dict[str, list[float]], base: dict[str, list[float]]) -> dict[str, float]:
    """Accuracy deltas against the baseline with their paired standard errors, from both runs'
    per-window NLLs (empty unless both scored the same number of windows, at least two)."""
    a, b = windows.get("nll", []), base.get("nll", [])
    n = len(a)
    if n < 2 or len(b) != n:
        return {}
    ppl_a, ppl_b = math.exp(statistics.fmean(a)), math.exp(statistics.fmean(b))
    differences = [x - y for x, y in zip(a, b)]
    # perplexity delta exp(mean a) - exp(mean b), linearised per window (the delta method)
    linearised = [ppl_a * x - ppl_b * y for x, y in zip(a, b)]
    out = {"nll_delta": statistics.fmean(differences),
           "nll_delta_stderr": statistics.stdev(differences) / math.sqrt(n),
           "perplexity_delta_stderr": statistics.stdev(linearised) / math.sqrt(n)}
    out["perplexity_delta_within_noise"] = float(abs(ppl_a - ppl_b) <= NOISE_Z * out["perplexity_delta_stderr"])
    return out


def method_label(params: dict[str, str]) -> str:
    """The method and its transforms in a few characters: ``gptq+hadamard/16``, ``rtn+awq+clip``.
    Runs from before methods existed were rounded to nearest."""
    parts = [params.get("method.name", "rtn")]
    rotation = params.get("method.rotation", "none")
    if rotation != "none":
        size = params.get("method.rotation_size", "0")
        parts.append(rotation if size == "0" else f"{rotation}/{size}")
    if params.get("method.scaling", "none") != "none":
        parts.append(params["method.scaling"])
    if params.get("method.clip") == "True":
        parts.append("clip")
    return "+".join(parts)


@dataclass
class Row:
    """One trial key's latest attempt, with its comparison against its baseline."""
    key: str
    run_id: str
    overrides: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    deltas: dict[str, float] = field(default_factory=dict)
    baseline: str = ""  # the baseline's overrides, or why there is none
    baseline_run_id: Optional[str] = None
    is_baseline: bool = False
    label: str = ""  # the overrides that tell this trial from the others in the sweep
    windows: dict[str, list[float]] = field(default_factory=dict)  # its per-window means, if it has them
    samples: dict[tuple[str, str], dict[int, float]] = field(default_factory=dict)  # its lm-eval examples' scores
    examples_problem: str = ""  # why its stored per-window means or task samples were not used

    def value(self, column: str) -> Any:
        if column == "trial":
            return self.label
        if column == "method":
            return method_label(self.params)
        if column == "dtype" and self.params.get("quant.rules", "[]") != "[]":
            return f"{self.params.get('dtype.name', '')}+rules"  # per-layer dtypes: quant.rules has them
        if column in ("model", "dtype", "quant", "kernel", "backend"):
            return self.params.get(f"{column}.name", "")
        if column in ("status", "baseline", "run_id"):
            return getattr(self, column)
        if is_comparison_metric(column):  # from this report's pairing only, never a stale logged value
            return self.deltas.get(column)
        return self.metrics.get(column)


def compare(rows: list[Row], baseline: dict[str, str]) -> None:
    """Fill each row's baseline and deltas (in place)."""
    baselines: dict[tuple, list[Row]] = {}
    common = set.intersection(*(set(r.overrides.split()) for r in rows)) if rows else set()
    for row in rows:
        row.label = " ".join(o for o in row.overrides.split() if o not in common) or row.overrides or row.key
        row.is_baseline = is_baseline(row.params, baseline)
        if row.is_baseline:
            baselines.setdefault(pair_key(row.params), []).append(row)
    for row in rows:
        candidates = baselines.get(pair_key(row.params), [])
        if not candidates:
            row.baseline = f"missing: no {describe(baseline)} cell with the same model, bench, eval, seed and device"
            continue
        # Several baseline cells may differ only in settings that do nothing at their dtype (quant):
        # prefer a finished one, then the one with the trial's own.
        base = min(candidates, key=lambda b: (b.status != "FINISHED",
                                              b.params.get("quant.name") != row.params.get("quant.name"), b.key))
        row.baseline, row.baseline_run_id = base.overrides or base.key, base.run_id
        if base.status != "FINISHED":
            row.baseline += f" ({base.status}: nothing to compare with)"
        elif row.status == "FINISHED":
            row.deltas = {**deltas(row.metrics, base.metrics), **paired_deltas(row.windows, base.windows),
                          **task_deltas(row.samples, base.samples)}


def notes(rows: list[Row]) -> list[str]:
    """What a reader must know to read the KL and top-1 columns right, and what is missing."""
    out = []
    for row in rows:
        kl = row.metrics.get("kl_divergence")
        if row.is_baseline and row.status == "FINISHED" and kl is not None and kl > 0:
            out.append(f"KL and top-1 are against the unquantized model at model.dtype="
                       f"{row.params.get('model.dtype')}; the baseline {row.label} is itself at KL {kl:.3g}, "
                       f"top-1 {row.metrics.get('top1_agreement', math.nan):.1%} from it")
    for row in rows:
        if row.examples_problem:
            out.append(f"{row.label}: its stored per-example scores were refused ({row.examples_problem}); "
                       f"no paired standard errors or flips for it or for the trials it is the baseline of")
    missing = [r.label for r in rows if r.baseline.startswith("missing")]
    if missing:
        out.append(f"no baseline for {len(missing)} trials ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
                   f": no speedups or deltas for them")
    return out
