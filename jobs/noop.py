"""``backend=noop``: a trial that does no model work.

It sleeps ``backend.noop.sleep_s`` and allocates ``backend.noop.allocate_gb`` of host memory, so the
orchestrator's own cost (benchmarks/overhead.py) and its handling of slow, killed and
out-of-memory trials can be measured and tested without a model.
"""

from __future__ import annotations

import os
import platform
import socket
import time

from jobs.spec import Status, TrialResult, TrialSpec, failure_reason


def run(spec: TrialSpec) -> TrialResult:
    noop = spec.settings.backend.noop
    # The GPUs the scheduler gave this trial (Ray sets CUDA_VISIBLE_DEVICES), for scheduling tests.
    result = TrialResult(trial_key=spec.trial_key, status=Status.RUNNING,
                         env={"host": socket.gethostname(), "python": platform.python_version(), "device": "none",
                              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")})
    started = time.perf_counter()
    try:
        held = bytearray(int(noop.allocate_gb * 2 ** 30))  # zero-filled: the pages are really touched
        time.sleep(noop.sleep_s)
        result.metrics = {"allocated_gb": len(held) / 2 ** 30, "slept_s": noop.sleep_s,
                          "synthetic_loss": (noop.x - 0.3) ** 2 + (noop.y + 0.2) ** 2,
                          "synthetic_cost": noop.x ** 2 + noop.y ** 2}
        result.status = Status.FINISHED
    except Exception as e:  # MemoryError included: the trial fails, the worker lives on
        result.status, result.reason = Status.FAILED, failure_reason(e)
    result.duration_s = time.perf_counter() - started
    result.artifacts["trial.log"] = f"noop trial {spec.trial_key}: {result.status.value} {result.reason or ''}\n"
    return result
