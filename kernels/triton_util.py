"""What the Triton kernels share: input checks, autotuning that stays cheap in the interpreter,
exact in-register decoders of our element and scale formats, and the split-K store."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.catalog import Unsupported

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

__all__ = ["FP4", "FP8_E4M3", "FP8_E5M2", "INT", "INTERPRETED", "SCALE_E4M3", "SCALE_E8M0", "SCALE_FP32", "Unsupported",
           "as_2d", "autotune", "check_activations", "check_device", "decode_field", "decode_scale", "load_tile",
           "split_k_workspace", "store_split_k"]


# Element decoders and scale kinds (constexpr globals: the only globals a compiled kernel may read).
INT, FP4, FP8_E4M3, FP8_E5M2 = (tl.constexpr(i) for i in range(4))
SCALE_FP32, SCALE_E8M0, SCALE_E4M3 = (tl.constexpr(i) for i in range(3))


@triton.jit
def decode_field(w, ELEM: tl.constexpr, BITS: tl.constexpr, J: tl.constexpr):
    """Field J (BITS wide, from bit BITS*J) of int32 words -> its element value as fp32, exactly.
    INT fields must be offset binary (the two's-complement code XOR 2**(BITS-1))."""
    if ELEM == INT:
        # OR-ing the field into the mantissa of 2**(23-P) (P: its bit offset) makes the float
        # 2**(23-P) + field, and one subtraction leaves the code: two instructions, no
        # quarter-rate int-to-float conversion.
        HIGH: tl.constexpr = ((23 - BITS) // BITS + 1) * BITS  # fields from here on would reach the
        P: tl.constexpr = BITS * J if BITS * J < HIGH else BITS * J - HIGH  # exponent: shift them down
        src = w if BITS * J < HIGH else w >> HIGH
        MASK: tl.constexpr = ((1 << BITS) - 1) << P
        EXPONENT: tl.constexpr = (150 - P) << 23
        OFFSET: tl.constexpr = 2.0 ** (23 - P) + 2 ** (BITS - 1)
        return ((src & MASK) | EXPONENT).to(tl.float32, bitcast=True) - OFFSET
    elif ELEM == FP4:
        # E2M1 sign to bit 31, exponent and mantissa to bits 23-24 and 22: that fp32 is the value
        # times 2**-126 (E2M1's subnormal 0.5 becomes an fp32 subnormal; mul.f32 keeps subnormals).
        sign = (w << (28 - 4 * J)) & -2147483648
        magnitude = (w << (22 - 4 * J) if 4 * J <= 22 else w >> (4 * J - 22)) & 0x01C00000
        return (sign | magnitude).to(tl.float32, bitcast=True) * 8.507059173023462e37  # 2**126
    else:
        byte = ((w >> (8 * J)) & 0xFF).to(tl.uint8)
        if ELEM == FP8_E4M3:
            return byte.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        return byte.to(tl.float8e5, bitcast=True).to(tl.float32)


@triton.jit
def decode_scale(s, SCALE: tl.constexpr):
    if SCALE == SCALE_FP32:
        return s
    elif SCALE == SCALE_E8M0:  # 2**(e-127); e=0 is the subnormal 2**-127, e=255 is NaN
        e = s.to(tl.int32)
        bits = tl.where(e == 0, 0x00400000, tl.where(e == 255, 0x7FC00000, e << 23))
        return bits.to(tl.float32, bitcast=True)
    else:
        return s.to(tl.float8e4nv, bitcast=True).to(tl.float32)


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
