"""The data plane's trial: plain functions of a TrialSpec, no Ray, no sweep."""

from __future__ import annotations

from jobs.spec import TrialResult, TrialSpec


def run_trial(spec: TrialSpec) -> TrialResult:
    """Run one trial; never raises. ``backend=noop`` imports no torch, so it costs only the orchestration."""
    if spec.settings.backend.name == "noop":
        from jobs import noop as backend
    else:
        from jobs import trial as backend
    return backend.run(spec)
