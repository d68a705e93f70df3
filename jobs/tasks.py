"""lm-evaluation-harness tasks on the trial's quantized model (``eval.tasks``, backend=hf).

lm-eval's ``HFLM`` wraps the model object the trial quantized (no reload), and
``simple_evaluate`` runs the tasks. Each task metric is logged as ``<task>.<metric>`` with its
standard error ``<task>.<metric>_stderr``: lm-eval's own where it gives one (the sample standard
error of a mean over examples); for the perplexity-style metrics it leaves as "N/A" (word and
byte perplexity, bits per byte: ratios of summed log-likelihood to summed words or bytes), the
ratio estimator's standard error over documents, by the delta method.

Every example's per-metric score goes to ``task_samples.csv`` (task, doc_id, metric, value), so
the report can pair a trial's examples with its baseline's and count flips (arXiv 2407.09141).

Shipped tasks (``SHIPPED``) read JSON lines under ``jobs/data/tasks/`` (built from the held-out
part of the shipped text by ``python -m jobs.data.build_tasks``); any other name is lm-eval's
own task, whose dataset comes from the hub. lm-eval is imported only when a trial has tasks.
"""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Any

from jobs.config import EvalConfig
from jobs.spec import TASK_SAMPLE_COLUMNS
from kernels.catalog import Unsupported

TASKS_DIR = Path(__file__).parent / "data" / "tasks"
INSTALL_HINT = "pip install 'quantsweep[lm-eval]'"


def _local(name: str) -> dict[str, Any]:
    return {"task": name, "dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": str(TASKS_DIR / f"{name}.jsonl")}}}


SHIPPED: dict[str, dict[str, Any]] = {
    "stdlib_next_word": {**_local("stdlib_next_word"), "output_type": "multiple_choice",
                         "doc_to_text": "{{context}}", "doc_to_choice": "choices", "doc_to_target": "label",
                         "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                         {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]},
    "stdlib_rolling": {**_local("stdlib_rolling"), "output_type": "loglikelihood_rolling",
                       "doc_to_text": "", "doc_to_target": "{{text}}",
                       "metric_list": [{"metric": m, "higher_is_better": False}
                                       for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]},
}
# lm-eval's perplexity-style metrics: per example (log-likelihood, words or bytes), aggregated as a ratio.
RATIO_METRICS = {"word_perplexity": "perplexity", "byte_perplexity": "perplexity", "bits_per_byte": "bits"}


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (needs accelerate: lm-eval[hf])
    except ImportError as e:
        raise Unsupported(f"eval.tasks needs lm-evaluation-harness ({e}): {INSTALL_HINT}") from None


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


def metric_key(key: str) -> str:
    """lm-eval's ``acc,none`` -> ``acc``; another filter is kept: ``exact_match_strict-match``."""
    metric, _, filter_name = key.partition(",")
    return _clean(metric + ("" if filter_name in ("", "none") else f"_{filter_name}"))


def metric_name(task: str, key: str) -> str:
    """The MLflow metric of lm-eval result ``key`` of ``task``: ``stdlib_next_word.acc``."""
    return f"{_clean(task)}.{metric_key(key)}"


def run_tasks(model, tokenizer, eval_cfg: EvalConfig, device, seed: int) -> tuple[dict[str, float], str]:
    """(metrics, task_samples.csv) of ``eval_cfg.tasks`` on ``model``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=eval_cfg.batch_size, device=str(device))
    tasks = [SHIPPED.get(name, name) for name in eval_cfg.tasks]
    out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=eval_cfg.num_fewshot, limit=eval_cfg.task_limit,
                          log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed)
    metrics: dict[str, float] = {}
    for task, results in out["results"].items():
        samples = out["samples"].get(task, [])
        for key, value in results.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            name = metric_name(task, key)
            metrics[name] = float(value)
            stderr = results.get(key.replace(",", "_stderr,", 1))
            metrics[f"{name}_stderr"] = (float(stderr) if isinstance(stderr, (int, float))
                                         else _ratio_stderr(samples, key.partition(",")[0], float(value)))
    return metrics, samples_csv(out["samples"])


def _ratio_stderr(samples: list[dict], metric: str, value: float) -> float:
    """The standard error of a perplexity-style metric over examples (NaN where it is not one)."""
    pairs = [s[metric] for s in samples if isinstance(s.get(metric), (tuple, list)) and len(s[metric]) == 2]
    kind = RATIO_METRICS.get(metric)
    n = len(pairs)
    if kind is None or n < 2:
        return math.nan
    loglik = [float(ll) for ll, _ in pairs]
    units = [float(u) for _, u in pairs]
    ratio = -sum(loglik) / sum(units)  # nats per word or byte
    mean_units = sum(units) / n
    residuals = [-ll - ratio * u for ll, u in zip(loglik, units)]
    se_ratio = math.sqrt(sum(r * r for r in residuals) / (n * (n - 1))) / mean_units
    # perplexity = exp(ratio); bits per byte = ratio / ln 2
    return value * se_ratio if kind == "perplexity" else se_ratio / math.log(2)


def samples_csv(samples: dict[str, list[dict]]) -> str:
    """Every example's numeric per-metric score: task, doc_id, metric, value."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(TASK_SAMPLE_COLUMNS)
    for task, rows in samples.items():
        for s in rows:
            for metric in s.get("metrics", []):
                value = s.get(metric)
                if isinstance(value, (bool, int, float)):
                    writer.writerow([_clean(task), int(s["doc_id"]), metric_key(f"{metric},{s.get('filter', 'none')}"),
                                     repr(float(value))])
    return out.getvalue()
