"""Decode GEMV: ``y = x @ dequant(W).T`` for a few rows of ``x``, on CUDA cores, for weights of
any of our packed formats (int4, int8, MXFP4, NVFP4, MXFP8 e4m3/e5m2).

At decode the weights are all the traffic, so the kernel is a stream over them: codes are
loaded as int32 words (128-bit loads), field j of a [BN, words] tile multiplies x at
K = per_word * word + j (no register shuffles), each field becomes an fp32 value in a few
integer instructions, products accumulate elementwise in a [BN, words] tile that is reduced
once after the K loop, and ``SPLIT_K`` programs per output tile are reduced in the same
launch (``store_split_k``). Scales apply per word (a word never straddles a scale block);
when the block size is a multiple of the K tile (so every tile lies inside one block), one
scale per row and tile is loaded instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.catalog import BlockSpec
from kernels.formats import QuantizedTensor
from kernels.triton_util import (FP4, FP8_E4M3, FP8_E5M2, INT, SCALE_E4M3, SCALE_E8M0, SCALE_FP32, autotune,
                                 decode_field, decode_scale, split_k_workspace, store_split_k)

ELEMENTS = {"int4": INT, "int8": INT, "mxfp4": FP4, "nvfp4": FP4, "mxfp8_e4m3": FP8_E4M3, "mxfp8_e5m2": FP8_E5M2}
MAX_ROWS = 4  # up to this many rows, re-reading the weights per row (from L2) beats a 16-row MMA tile


def configs() -> list[triton.Config]:
    # Each program keeps a few 128-bit words per thread in flight; split-K gives N=4096..14336
    # enough programs for 132 SMs, and 8 rows per thread (BN=256, 4 warps) amortise the x loads.
    return [triton.Config({"BN": bn, "BK": bk, "SPLIT_K": split}, num_warps=w, num_stages=1)
            for bn, bk, split, w in [(128, 128, 4, 4), (128, 128, 8, 4), (128, 128, 16, 4), (64, 128, 8, 4),
                                     (64, 128, 16, 4), (256, 128, 8, 4), (256, 128, 4, 8), (256, 128, 8, 8),
                                     (32, 128, 8, 4), (32, 128, 1, 4), (16, 128, 1, 4), (128, 64, 8, 4),
                                     (256, 64, 8, 4), (128, 64, 16, 4), (256, 32, 8, 4), (128, 32, 16, 4),
                                     (64, 256, 4, 4), (64, 256, 8, 4), (128, 256, 4, 8), (32, 512, 4, 4),
                                     (64, 256, 1, 4)]]


# Bounds over the configs (the interpreter's is inside them), for sizing the split-K workspace.
_MOST_SPLIT = max(c.kwargs["SPLIT_K"] for c in configs())
_WIDEST = max(c.kwargs["BN"] for c in configs())
_NARROWEST = min(c.kwargs["BN"] for c in configs())


@autotune(configs=configs, key=["M", "N", "K", "BLOCK", "ELEM", "BITS"],
          interpreter_config={"BN": 64, "BK": 128, "SPLIT_K": 2})  # big tiles: the interpreter pays per program
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BK"] == 0})
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, ts_ptr, y_ptr, partial_ptr, count_ptr, M, N, K, stride_xm, stride_xk,
                 stride_wn, stride_wk, stride_sn, stride_sb, stride_ym, stride_yn,
                 ELEM: tl.constexpr, BITS: tl.constexpr, SCALE: tl.constexpr, BLOCK: tl.constexpr,
                 TENSOR_SCALE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                 EVEN_K: tl.constexpr):
    row, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BK // PER_WORD
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BN, WORDS), dtype=tl.float32)
    for k0 in range(pid_k * BK, K, BK * SPLIT_K):
        words = tl.multiple_of(k0 // PER_WORD, WORDS) + tl.arange(0, WORDS)
        tile_mask = (rn[:, None] < N) & (EVEN_K or (PER_WORD * words[None, :] < K))  # EVEN_K: 128-bit loads
        w = tl.load(w_ptr + rn[:, None] * stride_wn + words[None, :] * stride_wk, mask=tile_mask, other=0,
                    eviction_policy="evict_first")
        if ELEM == INT:  # two's complement -> offset binary in every field; a masked word decodes to 0
            w = w ^ (-2004318072 if BITS == 4 else -2139062144)  # 0x88888888 / 0x80808080
        part = tl.zeros((BN, WORDS), dtype=tl.float32)
        for j in tl.static_range(PER_WORD):
            xj = tl.load(x_ptr + row * stride_xm + (PER_WORD * words + j) * stride_xk,
                         mask=EVEN_K or (PER_WORD * words < K), other=0.0)
            part += decode_field(w, ELEM, BITS, j) * xj.to(tl.float32)[None, :]
        if BLOCK % BK == 0:  # the tile lies inside one scale block: one scale per row
            s = tl.load(s_ptr + rn * stride_sn + (k0 // BLOCK) * stride_sb, mask=rn < N, other=0)
            acc += part * decode_scale(s, SCALE)[:, None]
        else:
            s = tl.load(s_ptr + rn[:, None] * stride_sn + (PER_WORD * words // BLOCK)[None, :] * stride_sb,
                        mask=tile_mask, other=0)
            acc += part * decode_scale(s, SCALE)
    out = tl.sum(acc, axis=1)
    if TENSOR_SCALE:
        out = out * tl.load(ts_ptr)
    tile = row * tl.num_programs(1) + pid_n
    store_split_k(out, y_ptr + row * stride_ym + rn * stride_yn, rn < N, partial_ptr, count_ptr,
                  tile * BN + tl.arange(0, BN), tile, pid_k, tl.num_programs(0) * tl.num_programs(1) * BN, SPLIT_K)


def scale_kind(weight: QuantizedTensor) -> tl.constexpr:
    """How the weight's scales are stored: fp32 values, E8M0 exponents (MX) or E4M3 bytes (NVFP4)."""
    if not isinstance(weight.spec, BlockSpec):
        return SCALE_FP32
    return SCALE_E8M0 if weight.spec.scale == "e8m0" else SCALE_E4M3


def fits(x2: torch.Tensor, weight: QuantizedTensor) -> bool:
    """Whether :func:`decode_gemv` takes this call: a few rows, and rows of whole int32 words."""
    return x2.shape[0] <= MAX_ROWS and weight.shape[1] % (32 // weight.element.bits) == 0


def decode_gemv(x2: torch.Tensor, weight: QuantizedTensor, scales: torch.Tensor, block: int,
                config: triton.Config | None = None) -> torch.Tensor:
    """``x2 @ dequant(weight).T`` in ``x2``'s dtype. ``scales``: [N, K // block] (fp32, or the E8M0 /
    E4M3 bytes of MX / NVFP4). The caller has checked the format, the activations and :func:`fits`.
    ``config`` (one of :func:`configs`, or any with BN, BK and SPLIT_K inside their bounds) pins the
    launch instead of autotuning."""
    m, (n, k) = x2.shape[0], weight.shape
    bits = weight.element.bits
    words = weight.codes.view(torch.int32).view(n, k * bits // 32)
    tensor_scale = weight.tensor_scale if weight.tensor_scale is not None else scales  # unused unless NVFP4
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    partial, count = split_k_workspace(x2.device, _MOST_SPLIT * m * triton.cdiv(n, _WIDEST) * _WIDEST,
                                       m * triton.cdiv(n, _NARROWEST))
    kernel, pinned = (_gemv_kernel, {}) if config is None else (
        _gemv_kernel.fn, {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages})
    kernel[lambda meta: (m, triton.cdiv(n, meta["BN"]), meta["SPLIT_K"])](
        x2, words, scales, tensor_scale, y, partial, count, m, n, k, x2.stride(0), x2.stride(1), words.stride(0),
        words.stride(1), scales.stride(0), scales.stride(1), y.stride(0), y.stride(1),
        ELEM=ELEMENTS[weight.spec.name].value, BITS=bits, SCALE=scale_kind(weight).value, BLOCK=block,
        TENSOR_SCALE=weight.tensor_scale is not None, **pinned)
    return y
