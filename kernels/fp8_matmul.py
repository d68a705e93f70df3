"""FP8 W8A8 (e4m3): per-token activation quantization, dynamic or under one static scale, then
an fp8 x fp8 GEMM with fp32 accumulation and the row (token) and column (channel or tensor)
scales applied to the accumulator.

The activation kernel computes scale = max|x_row| / 448 (1 for an all-zero row), the same
rule as ``kernels.formats`` with ``granularity=per_channel``; with a static scale (calibrated,
``quant.activation_scales=static``) every row takes it and values beyond 448 saturate, as
``kernels.formats`` does with ``granularity=per_tensor`` and given scales. In Triton's interpreter the
in-kernel fp32 -> fp8 cast rounds wrongly, so there the kernel stores the scaled fp32
values and torch does the cast; on a GPU the cast happens in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.formats import QuantizedTensor
from kernels.triton_util import INTERPRETED, Unsupported, as_2d, autotune, check_activations, load_tile

E4M3_MAX = 448.0


@triton.jit
def _act_quant_fp8_kernel(x_ptr, q_ptr, s_ptr, static_ptr, K, stride_xm, stride_qm, BK: tl.constexpr,
                          STATIC: tl.constexpr, CAST_IN_KERNEL: tl.constexpr):
    row = tl.program_id(0)
    if STATIC:
        scale = tl.load(static_ptr)
    else:
        amax = tl.zeros((BK,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + row * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        peak = tl.max(amax, axis=0)
        scale = tl.where(peak > 0, peak / 448.0, 1.0)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + row * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32) / scale
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)  # saturate: a static scale may not cover the row
        if CAST_IN_KERNEL:
            tl.store(q_ptr + row * stride_qm + rk, x.to(tl.float8e4nv), mask=rk < K)
        else:
            tl.store(q_ptr + row * stride_qm + rk, x, mask=rk < K)


def quantize_fp8_per_token(x: torch.Tensor,
                           static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 e4m3 codes [M, K], fp32 scales [M]) of 2-D activations: each row's own scale, or the
    one fp32 ``static_scale`` [1] for all."""
    m, k = x.shape
    scales = torch.empty(m, device=x.device, dtype=torch.float32)
    out = torch.empty((m, k), device=x.device, dtype=torch.float32 if INTERPRETED else torch.float8_e4m3fn)
    static = static_scale is not None
    _act_quant_fp8_kernel[(m,)](x, out, scales, static_scale.to(x.device, torch.float32) if static else scales, k,
                                x.stride(0), out.stride(0), BK=1024 if not INTERPRETED else 64, STATIC=static,
                                CAST_IN_KERNEL=not INTERPRETED)
    return (out.to(torch.float8_e4m3fn) if INTERPRETED else out), scales


def _configs():
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in [
        (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4), (64, 128, 128, 4, 4),
        (128, 128, 64, 4, 4), (64, 64, 128, 4, 4), (16, 64, 128, 4, 4)]]


@autotune(configs=_configs, key=["M", "N", "K"], interpreter_config={"BM": 16, "BN": 32, "BK": 32})
@triton.jit
def _fp8_matmul_kernel(x_ptr, w_ptr, sx_ptr, sw_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                       stride_ym, stride_yn, SW_PER_CHANNEL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = load_tile(x_ptr, rm, rk, M, K, stride_xm, stride_xk)
        w = load_tile(w_ptr, rk, rn, K, N, stride_wk, stride_wn)
        acc = tl.dot(x, w, acc)
    sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0) if SW_PER_CHANNEL else tl.load(sw_ptr)
    acc = acc * sx[:, None] * (sw[None, :] if SW_PER_CHANNEL else sw)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def fp8_scaled_mm(xq: torch.Tensor, sx: torch.Tensor, weight: QuantizedTensor, out_dtype: torch.dtype) -> torch.Tensor:
    """(xq * sx[:, None]) @ dequant(W).T for fp8 e4m3 activations and per-channel/per-tensor fp8 weights."""
    n, k = weight.shape
    if weight.spec.name != "fp8_e4m3" or weight.block not in (k, n * k):
        raise Unsupported(f"the fp8 W8A8 kernel takes fp8_e4m3 weights with per-channel or per-tensor scales, "
                          f"not {weight.spec.name} with {weight.block}-element scale blocks")
    if not INTERPRETED and torch.cuda.get_device_capability(xq.device) < (8, 9):
        raise Unsupported("fp8 tl.dot needs compute capability 8.9 or newer (Ada, Hopper, Blackwell)")
    m = xq.shape[0]
    w = weight.codes.view(torch.float8_e4m3fn).view(n, k)
    y = torch.empty((m, n), device=xq.device, dtype=out_dtype)

    def grid(meta):
        return triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"])

    _fp8_matmul_kernel[grid](xq, w, sx, weight.scales, y, m, n, k, xq.stride(0), xq.stride(1), w.stride(0),
                             w.stride(1), y.stride(0), y.stride(1), SW_PER_CHANNEL=weight.block == k)
    return y


def fp8_w8a8_linear(x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None = None,
                    static_scale: torch.Tensor | None = None) -> torch.Tensor:
    check_activations(x, weight.shape[1])
    x2 = as_2d(x)
    xq, sx = quantize_fp8_per_token(x2, static_scale)
    y = fp8_scaled_mm(xq, sx, weight, x.dtype)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.shape[0])
