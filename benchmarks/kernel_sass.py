"""The Triton kernels as a GPU would run them, without the GPU: compile each for a CUDA target
(sm_90 by default) with the ptxas that ships with Triton, disassemble, and report its main
loop: SASS instructions, instructions per weight element and thread, registers, spills,
shared memory, the width of the weight loads, layout conversions and tensor-core ops. Table
plus JSON.

Run time is what a GPU measures (``benchmarks/kernel_speed.py``); this is what explains it and
what can be checked on any machine: a decode GEMV issuing 15 instructions per int4 weight
element cannot stream 3 TB/s, one issuing 5 can. The integer arguments that Triton
specializes at run time (multiples of 16: N, K, leading strides; strides of 1) are
specialized the same way here, as for real model shapes.

    python benchmarks/kernel_sass.py --json kernel_sass.json [--arch 90] [--all-configs]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_sass.py compiles kernels: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import fp8_matmul, gemv, mx_matmul, wint_matmul  # noqa: E402
from kernels.triton_util import FP4, FP8_E4M3, INT, SCALE_E4M3, SCALE_E8M0, SCALE_FP32  # noqa: E402

# Results per SM per clock for compute capability 9.0 (CUDA C++ Programming Guide, "Arithmetic
# Instructions"), by SASS opcode: the pipe a warp instruction occupies for 32 / rate clocks.
# Unlisted opcodes (control, uniform datapath, tensor cores) only take an issue slot.
PIPE_RATES = {
    "fp32": (128, {"FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSET", "HFMA2", "HADD2", "HMUL2"}),
    "int": (64, {"IMAD", "IADD3", "IADD", "LOP3", "SHF", "SGXT", "PRMT", "LEA", "ISETP", "SEL", "FSEL", "MOV",
                 "VIADD", "IABS", "IMNMX", "BMSK", "P2R", "R2P", "CS2R", "LOP"}),
    "conversion": (16, {"I2F", "F2I", "F2F", "FRND", "I2FP", "F2FP", "MUFU"}),
    "memory": (32, {"LDG", "STG", "LDS", "STS", "LDGSTS", "ATOMG", "ATOM", "RED", "LDSM", "STSM", "LD", "ST"}),
    "shuffle": (32, {"SHFL"}),
}
ISSUE_PER_CLOCK = 4  # warp instructions per SM per clock (4 schedulers)
DIVISIBLE_BY_16 = {"N", "K", "stride_xm", "stride_qm", "stride_wn", "stride_ym"}
UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_yn", "stride_sg", "stride_sb"}
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass
class Case:
    name: str
    kernel: object  # a @triton.jit function, possibly under @autotune / @heuristics
    pointers: dict[str, str]  # pointer argument -> Triton type, e.g. "*bf16"
    constexprs: dict  # the non-tuned constexpr arguments
    tile: Callable[[dict], int]  # weight elements one loop iteration covers, from the config's kwargs
    configs: list[triton.Config]
    default: int = 0  # the config reported without --all-configs
    notes: dict = field(default_factory=dict)


def _jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def _gemv(fmt: str, elem, bits: int, scale, block: int) -> Case:
    scales = "*fp32" if scale is SCALE_FP32 else "*u8"
    return Case(f"gemv {fmt}", gemv._gemv_kernel,
                {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": scales, "ts_ptr": "*fp32", "y_ptr": "*bf16",
                 "partial_ptr": "*fp32", "count_ptr": "*i32"},
                {"ELEM": elem.value, "BITS": bits, "SCALE": scale.value, "BLOCK": block,
                 "TENSOR_SCALE": fmt == "nvfp4", "EVEN_K": True},
                lambda c: c["BN"] * c["BK"], gemv.configs(), default=1)


def _wint(fmt: str, bits: int, group: int) -> Case:
    return Case(f"mma {fmt}", wint_matmul._wint_matmul_kernel,
                {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*fp32", "y_ptr": "*fp32"},
                {"GROUP": group, "BITS": bits, "PER_CHANNEL": group == 8192, "EVEN_K": True},
                lambda c: c["BN"] * c["BK"], wint_matmul._configs(), default=6)


def _mx(fmt: str) -> Case:
    return Case(f"mma {fmt}", mx_matmul._mx_matmul_kernel,
                {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*u8", "ts_ptr": "*fp32", "y_ptr": "*bf16"},
                {"ELEM": gemv.ELEMENTS[fmt].value, "SCALE": (SCALE_E4M3 if fmt == "nvfp4" else SCALE_E8M0).value,
                 "BLOCK": 16 if fmt == "nvfp4" else 32, "TENSOR_SCALE": fmt == "nvfp4", "SCALE_ON_WEIGHTS": True},
                lambda c: c["BN"] * c["BK"], mx_matmul._configs(), default=5)


def cases() -> list[Case]:
    return [
        _gemv("int4 g128", INT, 4, SCALE_FP32, 128),
        _gemv("int8 per-channel", INT, 8, SCALE_FP32, 8192),
        _gemv("mxfp4", FP4, 4, SCALE_E8M0, 32),
        _gemv("nvfp4", FP4, 4, SCALE_E4M3, 16),
        _gemv("mxfp8_e4m3", FP8_E4M3, 8, SCALE_E8M0, 32),
        _wint("int4 g128", 4, 128),
        _wint("int8 per-channel", 8, 8192),
        _mx("mxfp4"), _mx("nvfp4"), _mx("mxfp8_e4m3"),
        Case("fp8 W8A8 GEMM", fp8_matmul._fp8_matmul_kernel,
             {"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "sx_ptr": "*fp32", "sw_ptr": "*fp32", "y_ptr": "*bf16"},
             {"SW_PER_CHANNEL": True}, lambda c: c["BN"] * c["BK"], fp8_matmul._configs()),
        *(Case(f"fp8 {kind} quantize", fp8_matmul._act_quant_fp8_kernel,
               {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "static_ptr": "*fp32"},
               {"BK": 1024, "STATIC": static, "CAST_IN_KERNEL": True}, lambda c: 1024, [triton.Config({}, num_warps=4)])
          for kind, static in (("per-token", False), ("static-scale", True))),
    ]


def compile_for(case: Case, config: triton.Config, arch: int):
    fn = _jit_function(case.kernel)
    constexprs = {**case.constexprs, **config.kwargs}
    constexprs.update({name: 1 for name in fn.arg_names if name in UNIT_STRIDES})
    signature = {name: "constexpr" if name in constexprs else case.pointers.get(name, "i32") for name in fn.arg_names}
    divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if name in case.pointers or name in DIVISIBLE_BY_16}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=divisible)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def _instructions(sass: str) -> list[tuple[int, str]]:
    return [(int(a, 16), i.strip()) for a, i in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]


def main_loop(instructions: list[tuple[int, str]]) -> list[str]:
    """The body of the longest loop: between a backward branch's target and the branch."""
    best: list[str] = []
    for addr, ins in instructions:
        m = re.search(r"\bBRA (0x[0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            body = [i for a, i in instructions if int(m.group(1), 16) <= a <= addr]
            best = max(best, body, key=len)
    return best


def _opcode(ins: str) -> str:
    return (ins.split()[1] if ins.startswith("@") else ins.split()[0]).split(".")[0]


def pipe_cycles(ops: collections.Counter) -> dict[str, float]:
    """SM clocks one warp's pass through the loop occupies on each pipe, and on issue."""
    cycles = {"issue": sum(ops.values()) / ISSUE_PER_CLOCK}
    for pipe, (rate, opcodes) in PIPE_RATES.items():
        cycles[pipe] = sum(n for op, n in ops.items() if op in opcodes) * 32 / rate
    return cycles


def analyse(case: Case, config: triton.Config, arch: int) -> dict:
    row = {"case": case.name, "config": {**config.kwargs, "num_warps": config.num_warps,
                                         "num_stages": config.num_stages}}
    try:
        kernel = compile_for(case, config, arch)
    except Exception as e:  # a kernel that does not compile is the finding
        return {**row, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}"}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([BIN / "cuobjdump", "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([BIN / "cuobjdump", "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    resources = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    loop = main_loop(_instructions(sass))
    ops = collections.Counter(_opcode(i) for i in loop)
    threads = config.num_warps * 32
    per_warp = case.tile(config.kwargs) / config.num_warps  # weight elements one warp's pass covers
    cycles = pipe_cycles(ops)
    bound = max(cycles, key=cycles.get)
    loads = collections.Counter(re.search(r"\b(LDG\S*)", i).group(1) for i in loop if "LDG" in i)
    return {**row, "registers": resources.get("reg", 0), "spill_bytes": resources.get("local", 0),
            "shared_bytes": kernel.metadata.shared, "loop_instructions": len(loop),
            "per_weight_element": len(loop) / (case.tile(config.kwargs) / threads) if loop else None,
            "sm_cycles_per_element": cycles[bound] / per_warp if loop else None, "bound_by": bound,
            "loads": dict(loads), "layout_conversions": kernel.asm["ttgir"].count("ttg.convert_layout"),
            # a pipelined operand is copied num_stages times: num_stages - 1 in the prologue, once in the loop
            "async_operands": kernel.asm["ttgir"].count("ttg.async_copy_global_to_local") // config.num_stages,
            "tensor_core_ops": ops["HGMMA"] + ops["HMMA"] + ops["QGMMA"] + ops["IMMA"],
            "top_opcodes": dict(ops.most_common(8))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=Path("kernel_sass.json"))
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper, 89: Ada, 80: A100)")
    ap.add_argument("--all-configs", action="store_true", help="every autotune config, not one per kernel")
    ap.add_argument("--only", default="", help="cases whose name contains this")
    args = ap.parse_args()
    rows = []
    for case in cases():
        if args.only not in case.name:
            continue
        for config in case.configs if args.all_configs else [case.configs[case.default]]:
            rows.append(analyse(case, config, args.arch))
    meta = {"arch": args.arch, "triton": triton.__version__}
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"sm_{args.arch}, triton {triton.__version__}. per element: main-loop SASS instructions per weight element "
          "and thread. SM clocks/element: the busiest pipe's (or issue's) clocks per weight element on one SM, "
          "from opcode counts and cc 9.0 throughputs; ignores latency and memory")
    print("| kernel | config | regs | spills | smem | loop instrs | per element | SM clocks/element (bound) "
          "| loads in the loop | layout conversions | tensor-core ops |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        if "error" in r:
            print(f"| {r['case']} | {cfg} | does not compile: {r['error']} ||||||||")
            continue
        per = f"{r['per_weight_element']:.1f}" if r["per_weight_element"] else "-"
        clocks = f"{r['sm_cycles_per_element']:.3f} ({r['bound_by']})" if r["sm_cycles_per_element"] else "-"
        loads = ", ".join(f"{n}x {op}" for op, n in sorted(r["loads"].items()))
        print(f"| {r['case']} | {cfg} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | "
              f"{r['loop_instructions']} | {per} | {clocks} | {loads} | {r['layout_conversions']} | "
              f"{r['tensor_core_ops']} |")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
