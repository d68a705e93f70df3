"""Block-scaled weights (MXFP4, MXFP8 e4m3/e5m2 with E8M0 scales per 32; NVFP4 with E4M3
scales per 16 under an fp32 tensor scale) times fp16/bf16/fp32 activations, dequantized in
registers, fp32 accumulation.

MX: a K tile is exactly one 32-element block, so the kernel multiplies the decoded element
values (exact in fp16/bf16) and applies the power-of-two block scale to the fp32 partial
sum. NVFP4: a 32-wide tile spans two 16-element blocks, so each element is multiplied by
its E4M3 block scale in registers (fp4 x e4m3 has at most 6 significant bits: exact in
fp16/bf16) and the tensor scale is applied to the accumulator at the end. ``tl.dot_scaled``
would take the scales natively on sm_100+; on Hopper this is the path. A few rows (decode)
go to ``kernels.gemv`` instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import gemv
from kernels.formats import QuantizedTensor
from kernels.triton_util import Unsupported, as_2d, autotune, check_activations, load_tile

ELEMENTS = {"mxfp4": 0, "nvfp4": 0, "mxfp8_e4m3": 1, "mxfp8_e5m2": 2}


@triton.jit
def _fp4_value(code):
    """E2M1 bit pattern (uint8, low 4 bits) -> fp32 value."""
    e = ((code >> 1) & 3).to(tl.float32)
    m = (code & 1).to(tl.float32)
    mag = tl.where(e == 0, m * 0.5, (1.0 + m * 0.5) * tl.exp2(e - 1.0))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _elements(w_ptr, rn, kk, N, K, stride_wn, stride_wk, ELEM: tl.constexpr):
    """Decoded weights [len(kk), BN] (fp32) at K indices ``kk`` (fp4: the byte index is kk // 2)."""
    mask = (rn[None, :] < N) & (kk[:, None] < K)
    if ELEM == 0:
        byte = tl.load(w_ptr + rn[None, :] * stride_wn + (kk[:, None] // 2) * stride_wk, mask=mask, other=0)
        return _fp4_value(tl.where(kk[:, None] % 2 == 0, byte & 0xF, byte >> 4))
    raw = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk, mask=mask, other=0)
    if ELEM == 1:
        return raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return raw.to(tl.float8e5, bitcast=True).to(tl.float32)


def _configs():
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in [
        (16, 64, 4, 4), (16, 128, 4, 4), (16, 256, 8, 3), (64, 128, 4, 4), (128, 128, 8, 3), (128, 256, 8, 3)]]


@autotune(configs=_configs, key=["M", "N", "K", "ELEM", "BLOCK"], interpreter_config={"BM": 16, "BN": 32})
@triton.jit
def _mx_matmul_kernel(x_ptr, w_ptr, s_ptr, ts_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                      stride_sn, stride_sb, stride_ym, stride_yn, ELEM: tl.constexpr, BLOCK: tl.constexpr,
                      E8M0: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    BK: tl.constexpr = 32
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = load_tile(x_ptr, rm, rk, M, K, stride_xm, stride_xk)
        w = _elements(w_ptr, rn, rk, N, K, stride_wn, stride_wk, ELEM)
        if E8M0:  # one block per tile: the power-of-two scale goes on the partial sum
            e = tl.load(s_ptr + rn * stride_sn + (k0 // BLOCK) * stride_sb, mask=rn < N, other=127)
            scale = tl.where(e == 255, float("nan"), tl.exp2(e.to(tl.float32) - 127.0))
            acc += tl.dot(x, w.to(x.dtype)) * scale[None, :]
        else:  # NVFP4: each element times its E4M3 block scale, in registers
            s = tl.load(s_ptr + rn[None, :] * stride_sn + (rk[:, None] // BLOCK) * stride_sb,
                        mask=(rn[None, :] < N) & (rk[:, None] < K), other=0)
            acc += tl.dot(x, (w * s.to(tl.float8e4nv, bitcast=True).to(tl.float32)).to(x.dtype))
    if not E8M0:
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
    codes = weight.codes.view(n, k // 2 if ELEMENTS[name] == 0 else k)
    scales = weight.scales.view(n, k // weight.block)
    if gemv.fits(x2, weight):
        y = gemv.decode_gemv(x2, weight, scales, weight.block)
        return (y if bias is None else y + bias).view(*x.shape[:-1], n)
    tensor_scale = weight.tensor_scale if weight.tensor_scale is not None else scales  # unused for MX
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)

    def grid(meta):
        return triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"])

    _mx_matmul_kernel[grid](x2, codes, scales, tensor_scale, y, m, n, k, x2.stride(0), x2.stride(1),
                            codes.stride(0), codes.stride(1), scales.stride(0), scales.stride(1), y.stride(0),
                            y.stride(1), ELEM=ELEMENTS[name], BLOCK=weight.block, E8M0=weight.spec.scale == "e8m0")
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], n)
