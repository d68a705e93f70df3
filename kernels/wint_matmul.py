"""W4A16 / W8A16: ``y = x @ W.T`` with int4 (packed two per byte) or int8 weights and
group-wise fp32 scales, dequantized in registers, fp32 accumulation.

Each K tile lies inside one scale group, so the kernel multiplies raw integer codes
(exact in fp16/bf16; decoded without int-to-float conversions, ``decode_field``) and
applies the group's scale once per tile to the fp32 partial sum (per channel: once, at the
end). For int4, byte j of a row holds codes 2j (low nibble) and 2j+1 (high nibble): both
are decoded and interleaved along K in registers, so ``x`` is loaded as one contiguous tile.
``SPLIT_K`` programs share the K loop of one output tile and add into an fp32 buffer. A few
rows (decode) go to ``kernels.gemv`` instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import gemv
from kernels.formats import QuantizedTensor
from kernels.triton_util import INT, Unsupported, as_2d, autotune, check_activations, decode_field


def _configs():
    cfgs = []
    for bm, bn, bk, split, warps, stages in [
        (16, 64, 128, 8, 4, 4), (16, 128, 128, 4, 4, 4), (16, 64, 256, 4, 4, 3), (16, 32, 128, 16, 4, 4),
        (16, 128, 64, 8, 4, 4), (64, 128, 64, 1, 4, 4), (128, 128, 64, 1, 8, 3), (128, 256, 64, 1, 8, 3),
        (64, 64, 32, 1, 4, 4), (16, 64, 32, 8, 4, 4), (128, 128, 128, 1, 8, 3), (64, 128, 128, 1, 4, 3),
    ]:
        cfgs.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "SPLIT_K": split}, num_warps=warps,
                                  num_stages=stages))
    return cfgs


def _prune(configs, named_args, **kwargs):
    """Keep the configs whose K tile lies inside one scale group."""
    args = {**named_args, **kwargs}  # constexprs passed by keyword arrive in kwargs
    group, k = args["GROUP"], args["K"]
    return [c for c in configs if group == k or group % c.kwargs["BK"] == 0]


@autotune(configs=_configs, key=["M", "N", "K", "GROUP", "BITS"], prune=_prune, reset_to_zero=["y_ptr"],
          interpreter_config={"BM": 16, "BN": 64, "BK": 32, "SPLIT_K": 2})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BK"] == 0})
@triton.jit
def _wint_matmul_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                        stride_sn, stride_sg, stride_ym, stride_yn,
                        GROUP: tl.constexpr, BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(pid_k * BK, K, BK * SPLIT_K):
        rk = k0 + tl.arange(0, BK)
        # EVEN_K: no K masks, so the tiles load as 128-bit asynchronous copies
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (EVEN_K or (rk[None, :] < K)), other=0.0)
        if BITS == 4:  # byte j holds codes 2j (low nibble) and 2j+1: decode both, interleave along K
            half = tl.multiple_of(k0 // 2, BK // 2) + tl.arange(0, BK // 2)
            w = tl.load(w_ptr + rn[None, :] * stride_wn + half[:, None] * stride_wk,
                        mask=(rn[None, :] < N) & (EVEN_K or (2 * half[:, None] < K)), other=0)
            w = w.to(tl.int32) ^ 0x88  # offset binary: decode_field converts without I2F
            lo = decode_field(w, INT, 4, 0).to(x.dtype)
            hi = decode_field(w, INT, 4, 1).to(x.dtype)
            codes = tl.join(lo, hi).permute(0, 2, 1).reshape(BK, BN)
        else:  # the compiler's own int8 -> fp16/bf16 conversion is packed, two codes per instruction
            w = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                        mask=(rn[None, :] < N) & (EVEN_K or (rk[:, None] < K)), other=0)
            codes = w.to(tl.int8).to(x.dtype)
        if PER_CHANNEL:  # one scale per column: chain the dots, scale once at the end
            acc = tl.dot(x, codes, acc)
        else:
            scale = tl.load(s_ptr + rn * stride_sn + (k0 // GROUP) * stride_sg, mask=rn < N, other=0.0)
            acc += tl.dot(x, codes) * scale[None, :]
    if PER_CHANNEL:
        acc *= tl.load(s_ptr + rn * stride_sn, mask=rn < N, other=0.0)[None, :]
    y = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y, acc, mask=mask)


def wint_linear(x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` for symmetric int4/int8 weights with per-channel or group scales."""
    spec = weight.spec
    if spec.name not in ("int4", "int8") or weight.zero_points is not None:
        raise Unsupported(f"the W4A16/W8A16 kernel takes symmetric int4/int8 weights, not {spec.name}"
                          + (" with zero points" if weight.zero_points is not None else ""))
    n, k = weight.shape
    group = k if weight.block in (k, n * k) else weight.block
    if group != k and group % 32:
        raise Unsupported(f"group size {group} is below the kernel's 32-wide K tile")
    check_activations(x, k)
    x2 = as_2d(x)
    m = x2.shape[0]
    scales = weight.scales.expand(n) if weight.block == n * k else weight.scales
    scales = scales.reshape(n, k // group)
    if gemv.fits(x2, weight):
        y = gemv.decode_gemv(x2, weight, scales, group)
    else:
        codes = weight.codes.view(n, k // 2 if spec.bits == 4 else k)
        y = torch.zeros((m, n), device=x.device, dtype=torch.float32)
        _wint_matmul_kernel[lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"]), meta["SPLIT_K"])](
            x2, codes, scales, y, m, n, k, x2.stride(0), x2.stride(1), codes.stride(0), codes.stride(1),
            scales.stride(0), scales.stride(1), y.stride(0), y.stride(1), GROUP=group, BITS=spec.bits,
            PER_CHANNEL=group == k)
        y = y.to(x.dtype)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], n)
