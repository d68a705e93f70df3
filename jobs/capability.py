"""What a trial's dtype and kernel need of the node, checked before the trial computes.

A mismatch raises :class:`~kernels.catalog.Unsupported` with the reason, so the trial is
UNSUPPORTED at once rather than crashing (or loading a model) first.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from jobs.config import TrialConfig, layer_dtypes
from kernels.catalog import Unsupported

FP8_DOT_CC = (8, 9)  # tl.dot and _scaled_mm on fp8: Ada, Hopper, Blackwell
INSTALL_HINTS = {"triton": "pip install triton", "torchao": "pip install 'torchao>=0.18'"}


def _require(package: str, why: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise Unsupported(f"{why} needs {package}, which is not installed on this node: {INSTALL_HINTS[package]}")


def check(cfg: TrialConfig, device: torch.device) -> None:
    if cfg.eval.tasks:
        if cfg.backend.name != "hf":
            raise Unsupported(f"eval.tasks (lm-evaluation-harness) runs on backend=hf's model, not backend="
                              f"{cfg.backend.name}; the text's perplexity and KL are measured on both")
        from jobs import tasks

        tasks.require_lm_eval()
    if cfg.backend.name == "vllm":
        from jobs import vllm_backend

        vllm_backend.online_quantization(cfg, device)
        vllm_backend.require_vllm()
        return
    kernel, quant = cfg.kernel.name, cfg.quant
    fp8_activations = quant.activations and quant.weights and any(d.format == "fp8_e4m3" for d in layer_dtypes(cfg))
    if kernel in INSTALL_HINTS:
        _require(kernel, f"kernel={kernel}")
    if kernel == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise Unsupported("kernel=triton needs a CUDA GPU (this trial runs on the CPU; give it resources.num_gpus, "
                          "or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)")
    if kernel in ("triton", "torchao") and fp8_activations and device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        if cc < FP8_DOT_CC:
            raise Unsupported(f"kernel={kernel} fp8 W8A8 needs compute capability >= 8.9; "
                              f"{torch.cuda.get_device_name(device)} has {cc[0]}.{cc[1]}")
