"""MLflow's system metrics (CPU and memory, GPU utilisation and memory), sampled on a trial's worker.

MLflow's own ``SystemMetricsMonitor`` logs to MLflow from the process it runs in; here only
the driver writes to MLflow (workers may not reach the store). So MLflow's monitors are
sampled on the worker, the samples travel back in the trial's result, and the driver logs
them as metric histories under MLflow's names (``system/...``): the UI's System metrics tab
shows them. Opt in with ``tracking.system_metrics_interval_s``.
"""

from __future__ import annotations

import threading
import time


def _monitors() -> list:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

    monitors = [CPUMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())
    except (ImportError, RuntimeError):  # no nvidia-ml-py, or no GPU on this node
        pass
    return monitors


class Sampler:
    """Samples every ``interval_s`` while in its ``with`` block; ``series`` maps a metric name
    to its ``(timestamp ms, step, value)`` samples."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.series: dict[str, list[tuple[int, int, float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="system-metrics", daemon=True)

    def __enter__(self) -> "Sampler":
        self._monitors = _monitors()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        step = 0
        while True:
            now = int(time.time() * 1000)
            for monitor in self._monitors:
                monitor.collect_metrics()
                for name, value in monitor.aggregate_metrics().items():
                    self.series.setdefault(f"system/{name}", []).append((now, step, float(value)))
                monitor.clear_metrics()
            step += 1
            if self._stop.wait(self.interval_s):
                return
