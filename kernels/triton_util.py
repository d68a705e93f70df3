"""What the Triton kernels share: input checks, and autotuning that stays cheap in the interpreter."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.catalog import Unsupported

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

__all__ = ["INTERPRETED", "Unsupported", "as_2d", "autotune", "check_activations", "check_device", "load_tile"]


@triton.jit
def load_tile(ptr, rows, cols, n_rows, n_cols, stride_r, stride_c):
    """The [len(rows), len(cols)] tile of a matrix, zero outside it (masks for ragged edges)."""
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


def autotune(configs, key: list[str], interpreter_config: dict, prune=None, reset_to_zero=None):
    """``triton.autotune`` over ``configs()`` on a GPU; one small fixed config in the interpreter,
    where timing configs would only measure the interpreter. ``reset_to_zero`` names outputs a
    kernel accumulates into (split-K): zeroed before every timed run, or the tuning runs add up."""
    def wrap(fn):
        if INTERPRETED:
            return triton.autotune(configs=[triton.Config(interpreter_config)], key=key)(fn)
        pruning = {"early_config_prune": prune} if prune else None
        return triton.autotune(configs=configs(), key=key, prune_configs_by=pruning,
                               reset_to_zero=reset_to_zero)(fn)
    return wrap


def check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRETED:
        raise Unsupported("the triton kernels need a CUDA GPU here (or TRITON_INTERPRET=1 to run them in "
                          "Triton's interpreter on the CPU)")


def check_activations(x: torch.Tensor, k: int, dtypes: tuple = ACTIVATION_DTYPES) -> None:
    check_device(x)
    if x.dtype not in dtypes:
        raise ValueError(f"activations must be one of {', '.join(map(str, dtypes))}, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"activations' last dimension {x.shape[-1]} does not match the weight's K={k}")


def as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])
