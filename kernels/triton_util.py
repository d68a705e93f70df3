"""What the Triton kernels share: input checks, and autotuning that stays cheap in the interpreter."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.catalog import Unsupported

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

__all__ = ["INTERPRETED", "Unsupported", "as_2d", "autotune", "check_activations", "check_device", "load_tile",
           "split_k_workspace", "store_split_k"]


@triton.jit
def load_tile(ptr, rows, cols, n_rows, n_cols, stride_r, stride_c):
    """The [len(rows), len(cols)] tile of a matrix, zero outside it (masks for ragged edges)."""
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def store_split_k(value, y_ptrs, mask, partial_ptr, count_ptr, slots, tile, pid_k, slots_per_split,
                  SPLIT_K: tl.constexpr):
    """Store ``value``, this program's fp32 sum over its share of K, at ``y_ptrs``: in one launch,
    in the output's dtype, and deterministically. With SPLIT_K > 1 every program writes its partial
    sum to its own ``slots`` of ``partial_ptr``; the last of the tile's programs to arrive (an
    atomic count per tile) adds the partials in a fixed order, stores, and resets the count for
    the next launch. So no memset, no fp32 output buffer and no cast kernel around a short GEMV."""
    if SPLIT_K == 1:
        tl.store(y_ptrs, value.to(y_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(partial_ptr + pid_k * slots_per_split + slots, value)
        tl.debug_barrier()  # all of this program's partials are written before the count says so
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            total = tl.load(partial_ptr + slots, cache_modifier=".cg")  # .cg: from L2, not a stale L1
            for k in tl.static_range(1, SPLIT_K):
                total += tl.load(partial_ptr + k * slots_per_split + slots, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count_ptr + tile, 0)


_WORKSPACES: dict = {}


def split_k_workspace(device: torch.device, partials: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 room for ``partials`` partial sums and ``tiles`` zeroed counts for :func:`store_split_k`,
    kept per device and stream and grown on demand: the counts are zero again after every launch,
    and launches on one stream never overlap."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream)
    partial, count = _WORKSPACES.get(key, (None, None))
    if partial is None or partial.numel() < partials:
        partial = torch.empty(partials, device=device, dtype=torch.float32)
    if count is None or count.numel() < tiles:
        count = torch.zeros(tiles, device=device, dtype=torch.int32)
    _WORKSPACES[key] = partial, count
    return partial, count


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
