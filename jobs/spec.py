"""What travels between the control plane and a trial: plain data, no torch, no Ray."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional


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


# The config sections a trial's result depends on: they make up the trial key. Where it
# runs and where its results go (cluster, tracking, resources, sweep) do not.
TRIAL_SECTIONS = ("model", "dtype", "quant", "kernel", "backend", "bench", "eval", "device", "seed")


@dataclass(frozen=True)
class TrialSpec:
    trial_key: str
    config: dict[str, Any]          # the resolved TRIAL_SECTIONS of the config, plain data
    overrides: tuple[str, ...] = ()  # the Hydra overrides that made this cell
    attempt: int = 1


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
