"""Block-scaled weights (MXFP4, MXFP8 e4m3/e5m2 with E8M0 scales per 32; NVFP4 with E4M3
scales per 16 under an fp32 tensor scale) times fp16/bf16/fp32 activations, dequantized in
registers, fp32 accumulation.

Elements are decoded in registers without table lookups or exp2 (``decode_field``). Each is
then multiplied by its block scale in registers and the dots chain in the accumulator: exact,
since an fp4/fp8 value times a power of two (MX) or an E4M3 scale (NVFP4) has at most 6
significant bits, and bf16 and fp32 have fp32's exponent range; only scaled weights below
2**-126, in bf16's subnormal range, round (blocks of weights near 1e-38). fp16's range is
narrower, so with fp16 activations an MX tile is exactly one block and its power-of-two
scale goes on the fp32 partial sum. NVFP4's tensor scale is applied at the end.
``tl.dot_scaled`` would take the scales natively on sm_100+; on Hopper this is the path. A
few rows (decode) go to ``kernels.gemv`` instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import gemv
from kernels.formats import QuantizedTensor
from kernels.triton_util import (FP4, SCALE_E8M0, Unsupported, as_2d, autotune, check_activations, decode_field,
                                 decode_scale)

ELEMENTS = ("mxfp4", "nvfp4", "mxfp8_e4m3", "mxfp8_e5m2")


def _configs():
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in [
        (16, 64, 64, 4, 4), (16, 128, 64, 4, 4), (16, 256, 32, 8, 3), (64, 128, 64, 4, 4), (64, 128, 32, 4, 4),
        (128, 128, 64, 8, 3), (128, 128, 32, 8, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3)]]


def _prune(configs, named_args, **kwargs):
    """K tiles that divide K (the loop has no K masks); on the partial sums, one scale block per tile."""
    args = {**named_args, **kwargs}  # constexprs passed by keyword arrive in kwargs
    fits = [c for c in configs if args["K"] % c.kwargs["BK"] == 0]
    return fits if args["SCALE_ON_WEIGHTS"] else [c for c in fits if c.kwargs["BK"] == args["BLOCK"]]


@autotune(configs=_configs, key=["M", "N", "K", "ELEM", "BLOCK", "SCALE_ON_WEIGHTS"], prune=_prune,
          interpreter_config={"BM": 16, "BN": 32, "BK": 32})
@triton.jit
def _mx_matmul_kernel(x_ptr, w_ptr, s_ptr, ts_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                      stride_sn, stride_sb, stride_ym, stride_yn, ELEM: tl.constexpr, SCALE: tl.constexpr,
                      BLOCK: tl.constexpr, TENSOR_SCALE: tl.constexpr, SCALE_ON_WEIGHTS: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):  # K is a multiple of BK: no K masks, 128-bit asynchronous copies
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=rm[:, None] < M, other=0.0)
        if ELEM == FP4:  # byte j holds elements 2j (low nibble) and 2j+1: decode both, interleave along K
            half = tl.multiple_of(k0 // 2, BK // 2) + tl.arange(0, BK // 2)
            b = tl.load(w_ptr + rn[None, :] * stride_wn + half[:, None] * stride_wk, mask=rn[None, :] < N, other=0)
            b = b.to(tl.int32)
            w = tl.join(decode_field(b, FP4, 4, 0), decode_field(b, FP4, 4, 1)).permute(0, 2, 1).reshape(BK, BN)
        else:
            b = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk, mask=rn[None, :] < N, other=0)
            w = decode_field(b.to(tl.int32), ELEM, 8, 0)
        if SCALE_ON_WEIGHTS:  # every element times its block scale, in registers; the dots chain
            s = tl.load(s_ptr + rn[None, :] * stride_sn + (rk[:, None] // BLOCK) * stride_sb,
                        mask=rn[None, :] < N, other=0)
            acc = tl.dot(x, (w * decode_scale(s, SCALE)).to(x.dtype), acc)
        else:  # one block per tile: its scale goes on the fp32 partial sum
            e = tl.load(s_ptr + rn * stride_sn + (k0 // BLOCK) * stride_sb, mask=rn < N, other=127)
            acc += tl.dot(x, w.to(x.dtype)) * decode_scale(e, SCALE)[None, :]
    if TENSOR_SCALE:
        acc = acc * tl.load(ts_ptr)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def mx_linear(x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` for MXFP4, MXFP8 (e4m3/e5m2) and NVFP4 weights."""
    name = weight.spec.name
    if name not in ELEMENTS:
        raise Unsupported(f"the block-scaled kernel takes {', '.join(ELEMENTS)} weights, not {name}")
    n, k = weight.shape
    if k % 32:
        raise Unsupported(f"K={k} is not a multiple of the kernel's 32-wide tile")
    check_activations(x, k)
    x2 = as_2d(x)
    m = x2.shape[0]
    scales = weight.scales.view(n, k // weight.block)
    if gemv.fits(x2, weight):
        y = gemv.decode_gemv(x2, weight, scales, weight.block)
        return (y if bias is None else y + bias).view(*x.shape[:-1], n)
    codes = weight.codes.view(n, k // 2 if weight.element.bits == 4 else k)
    tensor_scale = weight.tensor_scale if weight.tensor_scale is not None else scales  # unused for MX
    scale = gemv.scale_kind(weight)
    on_weights = not (scale is SCALE_E8M0 and x.dtype == torch.float16)  # fp16's range is too narrow for 2**e
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)

    def grid(meta):
        return triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"])

    _mx_matmul_kernel[grid](x2, codes, scales, tensor_scale, y, m, n, k, x2.stride(0), x2.stride(1),
                            codes.stride(0), codes.stride(1), scales.stride(0), scales.stride(1), y.stride(0),
                            y.stride(1), ELEM=gemv.ELEMENTS[name].value, SCALE=scale.value, BLOCK=weight.block,
                            TENSOR_SCALE=weight.tensor_scale is not None, SCALE_ON_WEIGHTS=on_weights)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], n)
