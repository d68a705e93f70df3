"""What travels between the control plane and a trial: plain data, no torch, no Ray."""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from jobs.config import BenchConfig, EvalConfig, TrialConfig


class Status(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    UNSUPPORTED = "UNSUPPORTED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self not in (Status.PENDING, Status.RUNNING)


# The config a trial's result depends on: it makes up the trial key. Where it runs and
# where its results go (cluster, tracking, resources, sweep) do not, except the GPU model
# it asks for (resources.accelerator_type): an H100 and an A100 time differently. A trial's
# config also holds all its resources, so it can be run again as it first ran.
TRIAL_SECTIONS = ("model", "dtype", "quant", "method", "calib", "kernel", "backend", "bench", "eval", "device", "seed")
# Sections a trial's config may lack: those stored before they existed, and calib where neither the
# method nor static activation scales use it (it is then no part of what the trial computes).
OPTIONAL_SECTIONS = ("method", "calib")
KEYED_RESOURCES = ("accelerator_type",)
# A trial's per-window accuracy means (jobs/evaluate.py writes it, the report pairs it with the baseline's).
EVAL_WINDOWS_FILE = "eval_windows.csv"
EVAL_WINDOW_COLUMNS = ("window", "nll", "reference_nll", "kl_divergence", "top1_agreement")
# Every lm-eval example's score (jobs/tasks.py writes it, the report pairs it with the baseline's for flips).
TASK_SAMPLES_FILE = "task_samples.csv"
TASK_SAMPLE_COLUMNS = ("task", "doc_id", "metric", "value")
# An lm-eval task's or metric's name as eval.tasks takes it and task_samples.csv stores it.
TASK_NAME = re.compile(r"[A-Za-z0-9_\-]{1,200}")


def context_length(bench: BenchConfig, eval_cfg: EvalConfig) -> int:
    """Tokens one sequence of the trial needs: a bench prompt, its first token and decode
    tokens, or an eval window and the one token an engine must generate after it (an
    engine's ``max_model_len`` must hold the longer)."""
    return max(bench.prompt_len + 1 + bench.decode_tokens, eval_cfg.seq_len + 1)


@dataclass(frozen=True)
class TrialSpec:
    trial_key: str
    config: dict[str, Any]          # the resolved TRIAL_SECTIONS of the config, plain data
    overrides: tuple[str, ...] = ()  # the Hydra overrides that made this cell
    attempt: int = 1                 # resubmissions are later attempts of the same trial key
    resubmit_overrides: tuple[str, ...] = ()  # overrides given to the resubmission that made this attempt

    @functools.cached_property
    def settings(self) -> TrialConfig:
        """``config``, typed: what the trial reads its settings through."""
        return TrialConfig.from_dict(self.config)


@dataclass
class TrialResult:
    trial_key: str
    status: Status
    metrics: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    # name -> text content; they travel back by value, workers may share no filesystem.
    artifacts: dict[str, str] = field(default_factory=dict)
    reason: Optional[str] = None     # one line: why FAILED / UNSUPPORTED / ...
    duration_s: float = 0.0
    # metric name -> (timestamp ms, step, value) samples: histories, such as system metrics
    series: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)


OUT_OF_MEMORY = "out of memory"
# How allocators say they ran out: CUDA's caching allocator, torch's CPU allocator, Python.
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory")


def failure_reason(error: BaseException) -> str:
    """One line for a trial's exception, ``<kind>: <first line>``; any out-of-memory error has
    the kind ``out of memory``, so OOMs can be found and resubmitted with a smaller batch."""
    text = str(error).strip()
    names = {c.__name__ for c in type(error).__mro__}
    is_oom = bool({"MemoryError", "OutOfMemoryError"} & names) or any(t in text.lower() for t in _OOM_TEXT)
    kind = OUT_OF_MEMORY if is_oom else type(error).__name__
    return f"{kind}: {text.splitlines()[0] if text else type(error).__name__}"[:500]
