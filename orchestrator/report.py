"""A sweep's comparison, made from the store: each trial paired with its baseline
(orchestrator.pairing), the deltas logged on each trial run, and a report on the parent.
``kl_divergence`` and ``top1_agreement``
are measured inside the trial, on the same tokens, against the unquantized model at
``model.dtype`` (logits are too big to ship between trials). That is the bf16 baseline's own
computation for a bf16 model; where it is not (the fp32 tiny model), the report says how far
the baseline itself is from that reference. A trial without a baseline says so in its
``baseline`` tag and in the report; it is never compared with another cell instead.

The report (``report/`` on the parent run; ``orchestrator report ID``, and at the end of
every sweep): ``comparison.csv``, ``comparison.html`` (the table and the plots, one
self-contained file), a Pareto plot per model (colour: kernel, marker: method), a speedup
heatmap (format x kernel) and the latency distributions. matplotlib is imported only here,
when a report is made.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from jobs.spec import EVAL_WINDOWS_FILE, TASK_SAMPLES_FILE
from orchestrator import accelerators
from orchestrator import recipe as recipes
from orchestrator import sensitivity, store, tracking
from orchestrator import study as studies
from orchestrator.pairing import (MAX_FILE_BYTES, NOISE_Z, TASK_DELTA_SUFFIXES, Row, compare, describe,
                                  is_comparison_metric, notes, parse_samples, parse_windows, stored_baseline)

LATENCY_MAX_TRIALS = 40
MARKERS = "osD^vP*X"  # one per method in the Pareto plots
COLUMNS = ("trial", "status", "model", "dtype", "quant", "method", "kernel", "backend", "decode_tokens_per_s",
           "speedup_decode", "prefill_tokens_per_s", "speedup_prefill", "peak_memory_mb", "memory_ratio",
           "weight_memory_ratio", "perplexity", "perplexity_stderr", "perplexity_delta", "perplexity_delta_stderr",
           "perplexity_delta_within_noise", "kl_divergence", "kl_divergence_stderr", "kl_divergence_p99_9",
           "top1_agreement", "top1_agreement_stderr", "baseline", "run_id")
# Shown in the HTML table and the terminal as "value ± stderr"; the CSV has both columns.
WITH_STDERR = ("perplexity", "perplexity_delta", "kl_divergence", "top1_agreement")


def load(client, parent) -> tuple[list[Row], dict[str, str]]:
    """One row per trial key (its latest attempt) with its comparison, and the baseline choices."""
    from orchestrator import schema, sweep_state

    sweep_id = parent.data.tags["sweep_id"]
    rows = []
    for key, runs in sweep_state.runs_by_key(client, parent, sweep_id).items():
        run = max(runs, key=sweep_state.attempt_of)
        rows.append(Row(key, run.info.run_id, run.data.tags.get("overrides", ""), run.data.tags.get("status", "?"),
                        dict(run.data.params), dict(run.data.metrics), dict(run.data.tags)))
        _load_examples(client, rows[-1])
    rows.sort(key=lambda r: (r.params.get("model.name", ""), r.overrides))
    # Sweeps from before the tag was written were compared with the default.
    baseline = stored_baseline(parent.data.tags) if "baseline" in parent.data.tags else schema.SweepConfig().baseline
    compare(rows, baseline)
    return rows, baseline


def record_deltas(client, rows: Iterable[Row]) -> None:
    """Each trial's comparison on its own run: delta metrics and the ``baseline``/``baseline_run_id`` tags."""
    from mlflow.entities import Metric, RunTag

    now = tracking.now_ms()
    for row in rows:
        tags = [RunTag("baseline", row.baseline[:5000])]
        if row.baseline_run_id:
            tags.append(RunTag("baseline_run_id", row.baseline_run_id))
        elif "baseline_run_id" in row.tags:  # paired by an earlier report, not any more
            client.delete_tag(row.run_id, "baseline_run_id")
        client.log_batch(row.run_id, metrics=[Metric(k, v, now, 0) for k, v in row.deltas.items()], tags=tags)


def generate(uri: str, sweep_id: str, out_dir: Optional[Path] = None) -> tuple[list[Row], list[str], list[dict]]:
    """Compare, record the deltas on the trial runs and the report on the parent run (``report/``),
    and keep a copy in ``out_dir`` if given. Returns the rows, the report's file names and, for a
    recipe's sweep, its predicted-against-measured lines (``recipe.comparison``)."""
    from orchestrator import sweep_state

    client, parent = sweep_state.open_sweep(uri, sweep_id)
    rows, baseline = load(client, parent)
    record_deltas(client, rows)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        names = write(folder, parent, rows, baseline, lambda row: _latency_samples(client, row),
                      studies.read(client, parent))
        client.log_artifacts(parent.info.run_id, str(folder), "report")
    note = recipes.stored_note(parent.data.tags)
    return rows, names, [] if note is None else recipes.comparison(note, rows)


def _load_examples(client, row: Row) -> None:
    """A finished trial's per-window accuracy and per-example task scores, for paired standard
    errors and flips. A run without them (noop, reused, or from before they were stored) has
    none; a malformed one is refused and noted on the row."""
    if row.status != "FINISHED":
        return
    for name, wanted, parse, attribute in (
            (EVAL_WINDOWS_FILE, "nll" in row.metrics, parse_windows, "windows"),
            (TASK_SAMPLES_FILE, any("." in m for m in row.metrics), parse_samples, "samples")):
        if not wanted:
            continue
        try:
            text = store.download_text(client, row.run_id, name, MAX_FILE_BYTES)
            if text is not None:
                setattr(row, attribute, parse(text))
        except ValueError as e:
            row.examples_problem = str(e)[:200]


def _latency_samples(client, row: Row) -> Optional[dict[str, list[float]]]:
    if row.status != "FINISHED" or "decode_tokens_per_s" not in row.metrics:
        return None
    try:  # none for an older run, and none from a malformed one: no distribution to draw
        text = store.download_text(client, row.run_id, "latency_ms.json", MAX_FILE_BYTES)
        samples = None if text is None else json.loads(text)
    except ValueError:
        return None
    if not (isinstance(samples, dict) and all(
            isinstance(v, list) and all(isinstance(x, (int, float)) for x in v) for v in samples.values())):
        return None
    return samples


def write(folder: Path, parent, rows: list[Row], baseline: dict[str, str], latency, study=None) -> list[str]:
    """The report's files in ``folder``; ``latency(row)`` gives a row's latency samples or None. A sensitivity
    sweep adds ``sensitivity.csv`` and a heatmap per baseline; a recipe's sweep, ``recipe.csv``; a study
    (``study``: its definition and trials, orchestrator.study.read), ``study.csv`` and ``study.png``."""
    names = ["comparison.csv"]
    columns = COLUMNS + task_columns(rows)
    _write_csv(folder / "comparison.csv", columns, [[r.value(c) for c in columns] for r in rows])
    figures = plots(rows, latency)
    sections = ""
    families = sensitivity.families(rows)
    if families:
        table = [line for family in families for line in sensitivity.table(family)]
        _write_csv(folder / "sensitivity.csv", sensitivity.SENSITIVITY_COLUMNS,
                   [[line[c] for c in sensitivity.SENSITIVITY_COLUMNS] for line in table])
        names.append("sensitivity.csv")
        figures.update({f"sensitivity_{_slug(f.name)}.png": _sensitivity_heatmap(f) for f in families})
        sections += _sensitivity_html(families)
    predicted = [line for r in rows if r.status == "FINISHED"
                 for line in accelerators.whatif(r.label, r.params, r.metrics)]
    if predicted:
        _write_csv(folder / "whatif.csv", accelerators.WHATIF_COLUMNS,
                   [[line[c] for c in accelerators.WHATIF_COLUMNS] for line in predicted])
        names.append("whatif.csv")
        sections += _whatif_html(predicted)
    if study is not None:
        definition, records = study
        lines = studies.table(definition, records, {r.key: r.run_id for r in rows})
        columns = list(lines[0]) if lines else []
        _write_csv(folder / "study.csv", columns, [[line[c] for c in columns] for line in lines])
        names.append("study.csv")
        figures["study.png"] = _study_plot(definition, records)
        sections += _study_html(definition, lines)
    note = recipes.stored_note(parent.data.tags)
    if note is not None:
        lines = recipes.comparison(note, rows)
        _write_csv(folder / "recipe.csv", recipes.COMPARISON_COLUMNS,
                   [[line[c] for c in recipes.COMPARISON_COLUMNS] for line in lines])
        names.append("recipe.csv")
        sections += _recipe_html(note, lines)
    for name, png in figures.items():
        (folder / name).write_bytes(png)
    names += list(figures)
    (folder / "comparison.html").write_text(_html(parent, rows, baseline, figures, sections))
    return names + ["comparison.html"]


def _write_csv(path: Path, columns: Sequence[str], lines: Iterable[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([_csv_value(v) for v in line] for line in lines)


def task_metrics(rows: list[Row]) -> list[str]:
    """The lm-eval task metrics any trial logged (``<task>.<metric>``), without their stderrs."""
    return sorted({m for r in rows for m in r.metrics
                   if "." in m and not m.endswith("_stderr") and not is_comparison_metric(m)})


def task_columns(rows: list[Row]) -> tuple[str, ...]:
    """Each task metric's CSV columns: value, stderr, paired delta and its stderr, the flips."""
    return tuple(f"{m}{suffix}" for m in task_metrics(rows)
                 for suffix in ("", "_stderr", *TASK_DELTA_SUFFIXES))


def _csv_value(value: Any) -> Any:
    return "" if value is None else value


# ---- plots -------------------------------------------------------------------------------------

def plots(rows: list[Row], latency) -> dict[str, bytes]:
    """PNG bytes by file name: a Pareto plot per model, the speedup heatmap, the latency distributions."""
    import matplotlib

    matplotlib.use("Agg")
    figures = {}
    compared = [r for r in rows if r.status == "FINISHED" and "decode_tokens_per_s" in r.metrics]
    for model in sorted({r.params.get("model.name", "") for r in compared}):
        figures[f"pareto_{_slug(model)}.png"] = _pareto(model, [r for r in compared if r.params.get("model.name") == model])
    if any("speedup_decode" in r.deltas for r in compared):
        figures["speedup_heatmap.png"] = _heatmap(compared)
    if any("decode_predicted_ms" in r.metrics for r in compared):
        figures["roofline.png"] = _roofline(compared)
    shown = _latency_rows(compared)
    samples = [(r, s) for r in shown if (s := latency(r))]
    if samples:
        figures["latency.png"] = _latency(samples, len(shown) < len(compared))
    return figures


def _roofline(rows: list[Row]):
    """Measured against roofline-predicted time, per trial, for the prefill and a decode step."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    for ax, phase in zip(axes, ("prefill", "decode")):
        shown = [r for r in rows if f"{phase}_predicted_ms" in r.metrics]
        for bound, marker in (("memory", "o"), ("compute", "s")):
            points = [(r.metrics[f"{phase}_predicted_ms"], r.metrics[f"{phase}_latency_p50_ms"], r) for r in shown
                      if r.tags.get(f"{phase}_bound") == bound]
            ax.scatter([p for p, _, _ in points], [m for _, m, _ in points], marker=marker, s=50, edgecolor="black",
                       label=f"{bound}-bound")
            for p, m, r in points:
                ax.annotate(_label(r), (p, m), textcoords="offset points", xytext=(5, 3), fontsize=7)
        values = [r.metrics[f"{phase}_{m}_ms"] for r in shown for m in ("predicted", "latency_p50")]
        if values:
            low, high = min(values) / 1.5, max(values) * 1.5
            ax.plot([low, high], [low, high], color="gray", linestyle="--", label="measured = predicted")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"{phase}: roofline-predicted ms (this node's measured peaks)")
        ax.set_ylabel(f"{phase}: measured ms (median)")
        ax.legend(fontsize=8)
    fig.suptitle("Measured against predicted: above the line, short of the roofline")
    return _png(fig)


def _sensitivity_heatmap(family: sensitivity.Family):
    """Layer group x dtype: each probe's KL increase over the baseline (log colour scale), the uniform
    points as the last row."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    groups, dtypes = family.groups, family.dtypes
    cells = {(line["group"], line["dtype"]): line["kl_increase"] for line in sensitivity.table(family)}
    labels = [*(g.removesuffix(".*") for g in groups), "all (uniform)"]
    grid = [[cells.get((g, d), math.nan) for d in dtypes] for g in [*groups, "all"]]
    positive = [v for line in grid for v in line if math.isfinite(v) and v > 0]
    low, high = (min(positive), max(positive)) if positive else (1e-6, 1e-5)
    fig, ax = plt.subplots(figsize=(1.6 * len(dtypes) + 4, 0.32 * len(labels) + 2), constrained_layout=True)
    image = ax.imshow([[v if math.isfinite(v) and v > 0 else math.nan for v in line] for line in grid],
                      cmap="magma_r", norm=LogNorm(vmin=low, vmax=max(high, low * 1.01)), aspect="auto")
    if len(labels) * len(dtypes) <= 400:
        for i, line in enumerate(grid):
            for j, v in enumerate(line):
                shown = math.isfinite(v) and v > 0
                dark = shown and image.norm(v) > 0.6
                ax.text(j, i, "n/a" if not math.isfinite(v) else f"{v:.2g}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black" if shown else "gray")
    ax.set_xticks(range(len(dtypes)), dtypes)
    ax.set_yticks(range(len(labels)), labels, fontsize=7 if len(labels) > 30 else 9)
    ax.set_xlabel("dtype of the probed group")
    fig.colorbar(image, ax=ax, label="KL increase over the baseline (nats/token)")
    ax.set_title(f"Layer sensitivity: {family.name}")
    return _png(fig)


def _latency_rows(rows: list[Row]) -> list[Row]:
    """Every trial, or in a big sweep the baselines and the Pareto-optimal trials (KL against
    decode throughput) of each model: one box per trial stops reading well past a few dozen."""
    if len(rows) <= LATENCY_MAX_TRIALS:
        return rows
    keep = []
    for model in sorted({r.params.get("model.name", "") for r in rows}):
        of_model = [r for r in rows if r.params.get("model.name", "") == model]
        front = set(_frontier([(r.metrics.get("kl_divergence", math.inf), r.metrics["decode_tokens_per_s"])
                               for r in of_model]))
        keep += [r for r in of_model if r.is_baseline or
                 (r.metrics.get("kl_divergence", math.inf), r.metrics["decode_tokens_per_s"]) in front]
    return keep[:LATENCY_MAX_TRIALS]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "model"


def _label(row: Row) -> str:
    return "/".join([row.params.get("dtype.name", ""), row.params.get("kernel.name", "")] +
                    [v for v, plain in ((row.value("method"), "rtn"), (row.params.get("backend.name"), "hf"))
                     if v not in (None, plain)])


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated points (lower cost, higher throughput), by cost."""
    best, front = -math.inf, []
    for cost, throughput in sorted(points, key=lambda p: (p[0], -p[1])):
        if throughput > best:
            front.append((cost, throughput))
            best = throughput
    return front


def _pareto(model: str, rows: list[Row]):
    import matplotlib.pyplot as plt

    panels = (("kl_divergence", "KL divergence from the unquantized model (nats/token)"),
              ("perplexity_delta", "perplexity increase over the baseline"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    kernels = sorted({r.params.get("kernel.name", "") for r in rows})
    colors = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kernels)}
    methods = sorted({r.value("method") for r in rows})
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(methods)}
    for ax, (metric, xlabel) in zip(axes, panels):
        points = []
        for row in rows:
            x = row.value(metric)
            if x is None:
                continue
            y = row.metrics["decode_tokens_per_s"]
            points.append((x, y))
            ax.scatter(x, y, s=60, color=colors[row.params.get("kernel.name", "")], marker=markers[row.value("method")],
                       edgecolor="black", zorder=3)
            ax.annotate(_label(row), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if points:
            front = _frontier(points)
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray", linestyle="--",
                    zorder=2, label="Pareto frontier")
        if metric == "kl_divergence":  # spans decades, and the baseline sits at or near 0
            ax.set_xscale("symlog", linthresh=1e-4)
            xlabel += " (symlog)"
        ax.set_xlabel(xlabel)
        ax.set_ylabel("decode throughput (tokens/s)")
        ax.grid(True, alpha=0.3)
        for kernel in kernels:
            ax.scatter([], [], color=colors[kernel], edgecolor="black", label=f"kernel={kernel}")
        if len(methods) > 1:
            for method in methods:
                ax.scatter([], [], color="white", marker=markers[method], edgecolor="black", label=f"method={method}")
        ax.legend(fontsize=8, loc="best")
    bench = rows[0].params
    fig.suptitle(f"{model}: decode throughput against accuracy cost (batch {bench.get('bench.batch_size')}, "
                 f"prompt {bench.get('bench.prompt_len')} tokens; up and left is better)")
    return _png(fig)


def _study_plot(definition, records) -> bytes:
    """The values Optuna was told, coloured by the order they were tried, and the Pareto front found: the
    first two objectives against each other, or one objective against the trial number."""
    import matplotlib.pyplot as plt

    names = list(definition.objectives)
    done = [r for r in records if r.state == "COMPLETE" and r.values]
    front = studies.pareto_front(definition, records)
    fig, ax = plt.subplots(figsize=(7.5, 5), constrained_layout=True)
    if len(names) == 1:
        ax.scatter([r.number for r in done], [r.values[0] for r in done], c=[r.batch for r in done], cmap="viridis",
                   edgecolor="black", zorder=3)
        pick, best, line = (min if definition.objectives[names[0]] == "minimize" else max), None, []
        for r in sorted(done, key=lambda r: r.number):
            best = r.values[0] if best is None else pick(best, r.values[0])
            line.append((r.number, best))
        ax.step([p[0] for p in line], [p[1] for p in line], where="post", color="gray", linestyle="--",
                label="best so far", zorder=2)
        ax.set_xlabel("trial (the order Optuna asked for them); colour: batch")
        ax.set_ylabel(f"{names[0]} ({definition.objectives[names[0]]})")
    else:
        points = ax.scatter([r.values[0] for r in done], [r.values[1] for r in done], c=[r.number for r in done],
                            cmap="viridis", edgecolor="black", zorder=3)
        fig.colorbar(points, ax=ax, label="trial (the order tried)")
        ordered = sorted(front, key=lambda r: (r.values[0], r.values[1]))
        ax.plot([r.values[0] for r in ordered], [r.values[1] for r in ordered], color="red", marker="o",
                markerfacecolor="none", markersize=12, linestyle="--", label="Pareto front found", zorder=4)
        ax.set_xlabel(f"{names[0]} ({definition.objectives[names[0]]})")
        ax.set_ylabel(f"{names[1]} ({definition.objectives[names[1]]})")
    failed = len(records) - len(done)
    ax.set_title(f"study: {len(records)} trials, {len(front)} on the Pareto front" +
                 (f", {failed} failed or not yet told" if failed else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def _study_html(definition, lines: list[dict]) -> str:
    objectives = ", ".join(f"{html.escape(m)} ({d})" for m, d in definition.objectives.items())
    front = [line for line in lines if line["on_pareto_front"]]
    if not front:
        return f"<h2>Study</h2><p>Objectives: {objectives}. No trial completed.</p>"
    columns = {c: c.split(":", 1)[1] for c in front[0] if c.startswith(("param:", "value:"))}
    head = "<th>trial</th>" + "".join(f"<th>{html.escape(name)}</th>" for name in columns.values())
    body = "".join(f"<tr><td>{line['number']}</td>" + "".join(f"<td>{html.escape(_fmt(name, line[c]))}</td>"
                                                              for c, name in columns.items()) + "</tr>"
                   for line in front)
    return (f"<h2>Study</h2><p>Objectives: {objectives}; {len(lines)} trials asked by {html.escape(definition.sampler['name'])}"
            f" in batches of {definition.n_jobs} (every trial, in the order tried: study.csv). The Pareto front found:</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _heatmap(rows: list[Row]):
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    models = sorted({r.params.get("model.name", "") for r in rows if "speedup_decode" in r.deltas})
    fig, axes = plt.subplots(1, len(models), figsize=(max(6, 5 * len(models)), 4.8), squeeze=False,
                             constrained_layout=True)
    for ax, model in zip(axes[0], models):
        cells: dict[tuple[str, str], list[float]] = {}
        for r in rows:
            if r.params.get("model.name") == model and "speedup_decode" in r.deltas:
                cells.setdefault((r.params["dtype.name"], r.params["kernel.name"]), []).append(r.deltas["speedup_decode"])
        formats = sorted({f for f, _ in cells})
        kernels = sorted({k for _, k in cells})
        grid = [[statistics.median(cells[(f, k)]) if (f, k) in cells else math.nan for k in kernels] for f in formats]
        values = [v for line in grid for v in line if not math.isnan(v) and v > 0]
        spread = max([1.1] + [max(v, 1 / v) for v in values])  # a log scale centred on 1x: 2x and 0.5x look alike
        image = ax.imshow(grid, cmap="RdYlGn", norm=LogNorm(vmin=1 / spread, vmax=spread), aspect="auto")
        for i, line in enumerate(grid):
            for j, v in enumerate(line):
                ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.2f}x", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(kernels)), kernels)
        ax.set_yticks(range(len(formats)), formats)
        ax.set_xlabel("kernel")
        ax.set_ylabel("format (dtype)")
        ax.set_title(model)
        bar = fig.colorbar(image, ax=ax, label="decode speedup over the baseline")
        ticks = [t for t in (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4) if 1 / spread <= t <= spread]
        bar.set_ticks(ticks, labels=[f"{t:g}x" for t in ticks])
        bar.minorticks_off()
    fig.suptitle("Decode speedup by format and kernel (median over the other settings)")
    return _png(fig)


def _latency(samples: list[tuple[Row, dict[str, list[float]]]], selected: bool):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.0, 0.45 * len(samples) + 1.5)), constrained_layout=True)
    labels = [f"{r.params.get('model.name')} {_label(r)}" for r, _ in samples]
    for ax, (name, title) in zip(axes, (("prefill_ms", "prefill latency per batch (ms)"),
                                        ("decode_ms", "decode latency per token (ms)"))):
        data = [s.get(name) or [math.nan] for _, s in samples]
        ax.boxplot(data, orientation="horizontal", showfliers=True)
        ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=8)
        ax.set_xlabel(title)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Latency distributions per trial (timed repeats after warm-up)" +
                 ("; baselines and Pareto-optimal trials only" if selected else ""))
    return _png(fig)


# ---- HTML and terminal -------------------------------------------------------------------------

def _fmt(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if column.startswith("speedup") or column.endswith("ratio"):
            return f"{value:.2f}x"
        if column == "kl_divergence":
            return f"{value:.1e}"
        if column == "perplexity_delta":
            return f"{value:+.2g}"
        if column == "top1_agreement":
            return f"{value:.1%}"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def _cell(row: Row, column: str) -> str:
    """A table cell: the value, and for WITH_STDERR its standard error and whether it is within noise."""
    text = _fmt(column, row.value(column))
    stderr = row.value(f"{column}_stderr") if column in WITH_STDERR else None
    if text and stderr is not None and math.isfinite(stderr):
        text += f" ± {_fmt(column, stderr).lstrip('+')}"
    if column == "perplexity_delta" and row.value("perplexity_delta_within_noise") == 1.0 and not row.is_baseline:
        text += " (noise)"
    return text


HTML_COLUMNS = tuple(c for c in COLUMNS if not c.endswith(("_stderr", "_within_noise")))


def _html(parent, rows: list[Row], baseline: dict[str, str], figures: dict[str, bytes], sections: str = "") -> str:
    sweep_id = parent.data.tags.get("sweep_id", "")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in HTML_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r, c))}</td>" for c in HTML_COLUMNS) + "</tr>"
                   for r in rows)
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes(rows))
    tasks = _tasks_html(rows)
    images = "".join(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
                     f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(name)}</figcaption></figure>'
                     for name, png in figures.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sweep {html.escape(sweep_id)}: comparison</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}} th{{background:#eee}}
td:first-child{{text-align:left}} img{{max-width:100%}}</style></head>
<body><h1>Sweep {html.escape(sweep_id)}</h1>
<p>{len(rows)} trials. Baseline: {html.escape(describe(baseline))}, same model, bench, eval, seed and device.
Speedups and memory ratios are trial / baseline; perplexity delta is trial minus baseline; KL divergence and
top-1 agreement are against the unquantized model on the same tokens. ± is one standard error over the eval
windows; a perplexity delta's is paired (both runs scored the same windows), and "(noise)" marks a delta within
{NOISE_Z} standard errors of zero.</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{tasks}
{sections}
{f"<h2>Notes</h2><ul>{items}</ul>" if items else ""}
{images}
</body></html>
"""


def _sensitivity_html(families: list[sensitivity.Family]) -> str:
    """Per baseline, each probe's KL increase (layer group x dtype), most sensitive first."""
    parts = ["<h2>Layer sensitivity</h2><p>Each probe quantizes one layer group to one dtype and leaves the rest "
             "at the baseline's; its sensitivity is its KL divergence minus the baseline's, ± the standard error of "
             "the per-window differences. The uniform rows put every layer at the dtype. Heatmaps below; "
             "<code>orchestrator recipe ID --budget-bits B</code> turns these into a mixed-precision recipe.</p>"]
    head = "".join(f"<th>{c}</th>" for c in ("group", "dtype", "KL increase ± stderr", "KL", "weight SQNR min (dB)"))
    for family in families:
        lines = sorted(sensitivity.table(family), key=lambda line: -line["kl_increase"]
                       if math.isfinite(line["kl_increase"]) else math.inf)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in (
            line["group"], line["dtype"], _pm(line["kl_increase"], line["kl_increase_stderr"], "+.3g"),
            _pm(line["kl_divergence"], line["kl_divergence_stderr"], ".3g"),
            _fmt("layer_sqnr_db_min", line["layer_sqnr_db_min"]))) + "</tr>" for line in lines)
        parts.append(f"<h3>{html.escape(family.name)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}"
                     f"</tbody></table>")
    return "".join(parts)


def _recipe_html(note: dict, lines: list[dict]) -> str:
    head = "".join(f"<th>{c}</th>" for c in ("configuration", "bits per weight", "KL ± stderr"))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in (
        line["configuration"], f"{line['bits_per_weight']:.4f}",
        _pm(line["kl_divergence"], line["kl_divergence_stderr"], ".4g"))) + "</tr>" for line in lines)
    return (f"<h2>Recipe {html.escape(note['name'])}</h2><p>From the sensitivity sweep {html.escape(note['source'])} "
            f"within {note['budget_bits']:g} bits per weight: predicted (the baseline's KL plus each chosen group's "
            f"measured increase) against measured, beside the uniform configurations.</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _whatif_html(lines: list[dict]) -> str:
    head = "".join(f"<th>{c}</th>" for c in ("trial", "accelerator", "prefill tokens/s", "decode tokens/s"))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in (
        line["trial"], line["accelerator"] + (" (emulated)" if line["emulated"] else ""),
        f"{line['prefill_tokens_per_s']:.4g} ({line['prefill_bound']})",
        f"{line['decode_tokens_per_s']:.4g} ({line['decode_bound']})")) + "</tr>" for line in lines)
    sources = "".join(f"<li>{html.escape(a.name)}: {html.escape(a.source)}</li>" for a in accelerators.ACCELERATORS)
    return (f"<h2>What if: the same bench on other accelerators</h2><p>Each trial's logged bytes and FLOPs at each "
            f"accelerator's datasheet bandwidth and dense peaks (the roofline: no kernel reaches it); the bound in "
            f"brackets. <em>emulated</em>: a format the accelerator does not compute, run dequantized at the compute "
            f"dtype's rate.</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<p>Sources:</p><ul>{sources}</ul>")


def _pm(value: Optional[float], stderr: Optional[float], spec: str) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:{spec}}" + (f" ± {stderr:.2g}" if stderr is not None and math.isfinite(stderr) else "")


def _tasks_html(rows: list[Row]) -> str:
    """lm-eval tasks: one line per trial and task metric, with its paired delta and flips."""
    metrics = task_metrics(rows)
    if not metrics:
        return ""
    head = "".join(f"<th>{c}</th>" for c in ("trial", "task metric", "value ± stderr", "Δ vs baseline ± stderr",
                                              "correct → wrong", "wrong → correct"))
    lines = []
    for row in rows:
        for m in metrics:
            if m not in row.metrics:
                continue
            value, se = row.metrics[m], row.metrics.get(f"{m}_stderr", math.nan)
            delta, delta_se = row.value(f"{m}_delta"), row.value(f"{m}_delta_stderr")
            cells = (row.label, m, f"{value:.4g}" + (f" ± {se:.2g}" if math.isfinite(se) else ""),
                     "" if delta is None or row.is_baseline else f"{delta:+.3g}" + (
                         f" ± {delta_se:.2g}" if delta_se is not None else ""),
                     *("" if row.is_baseline or row.value(f"{m}{s}") is None else f"{row.value(f'{m}{s}'):.1%}"
                       for s in ("_correct_to_wrong", "_wrong_to_correct")))
            lines.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return (f"<h2>lm-eval tasks</h2><p>Deltas are paired over the examples both runs scored; flips are the "
            f"fractions of those examples whose 0/1 score changed each way against the baseline.</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>")


def _terminal_delta(row: Row) -> str:
    """The perplexity delta for an 80-column terminal: ``-0.11±0.06``, ``~`` in front if within noise."""
    delta, stderr = row.value("perplexity_delta"), row.value("perplexity_delta_stderr")
    if delta is None or row.is_baseline or stderr is None or not math.isfinite(stderr):
        return _fmt("perplexity_delta", delta)
    noise = "~" if row.value("perplexity_delta_within_noise") == 1.0 else ""
    return f"{noise}{delta:+.2g}±{stderr:.1g}"


def print_table(rows: list[Row], sweep_id: str, recipe_lines: Sequence[dict] = ()) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    shown = {"trial": "trial", "status": "status", "decode_tokens_per_s": "tok/s",
             "speedup_decode": "×decode", "speedup_prefill": "×prefill", "memory_ratio": "×memory",
             "perplexity_delta": "Δ ppl", "kl_divergence": "KL", "top1_agreement": "top-1"}
    if all(r.status == "FINISHED" for r in rows):
        del shown["status"]
    # No vertical rules, no edge padding: a sweep of one model fits an 80-column terminal.
    table = Table(title=f"sweep {sweep_id} against its baselines (all columns: report/comparison.csv)",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column, header in shown.items():
        table.add_column(header, overflow="fold", no_wrap=column != "trial",
                         min_width=min(16, max([len(r.label) for r in rows] + [5])) if column == "trial" else None,
                         justify="left" if column in ("trial", "status") else "right")
    for r in rows:
        table.add_row(*(_terminal_delta(r) if c == "perplexity_delta" else _fmt(c, r.value(c)) for c in shown),
                      style="bold" if r.is_baseline else None)
    console = Console()
    console.print(table)
    if any(r.value("perplexity_delta_stderr") is not None for r in rows):
        console.print(f"Δ ppl ± its paired standard error; ~ marks a delta within {NOISE_Z} of them (noise)",
                      highlight=False)
    for line in recipe_lines:  # a recipe's sweep: predicted against measured, beside the uniform points
        console.print(f"{line['configuration']}: {line['bits_per_weight']:.3f} bits per weight, KL "
                      f"{_pm(line['kl_divergence'], line['kl_divergence_stderr'], '.3g')}", highlight=False)
    for note in notes(rows):
        console.print(f"note: {note}", highlight=False)
