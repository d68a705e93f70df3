"""The node's measured peaks: memory bandwidth and matmul throughput per precision, measured once per
node (device, torch version, CPU threads) and kept in the cache with how they were measured.

Bandwidth is a device-to-device copy of a buffer far larger than any cache (read + write bytes over the
best time of several); throughput a square matmul per precision the device computes: fp32 and bf16 on
the CPU; bf16, fp16, fp32 (TF32 off), fp8 (``torch._scaled_mm``, compute capability 8.9 and up) and
int8 (``torch._int_mm``) on a GPU. A precision whose op fails here is left out, and the trial's roofline
then runs it at its compute dtype's rate. These are what this node reaches with torch's kernels, which
is the fair ceiling for a trial that runs them; a datasheet's peak is what ``orchestrator/accelerators.py``
holds.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import torch

from jobs.cache import build_once, cache_root
from jobs.perf_model import Peaks

log = logging.getLogger(__name__)
PEAKS_FILE = "peaks.json"
BANDWIDTH_MIB = {"cpu": 256, "cuda": 2048}
MATMUL_MAX = {"cpu": 2048, "cuda": 8192}  # n grows from 256 until one matmul takes LONG_ENOUGH_S, or this
# Small matmuls run below the rate of a model's large ones (an 8B-shaped block's bf16 prefill reached 1.07x
# a peak measured at 50 ms per call): measure where one call takes this long.
LONG_ENOUGH_S = 0.2
METHOD = 3  # part of the cache key: a change to how peaks are measured measures them again
REPEATS = 5


def node_peaks(device: torch.device) -> tuple[Peaks, dict]:
    """(this node's peaks, the stored record: values, how measured, versions), measured on first use."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    threads = torch.get_num_threads()
    key = "".join(c if c.isalnum() else "-" for c in f"{name}-torch{torch.__version__}-t{threads}-m{METHOD}")[:150]
    folder = cache_root() / "peaks" / key

    def make(tmp: Path) -> None:
        record = measure(device)
        record.update(device_name=name, torch_version=torch.__version__, threads=threads)
        (tmp / PEAKS_FILE).write_text(json.dumps(record, indent=2))

    build_once(folder, PEAKS_FILE, make)
    record = json.loads((folder / PEAKS_FILE).read_text())
    return Peaks(record["bandwidth_bytes_per_s"], record["flops_per_s"]), record


def measure(device: torch.device) -> dict:
    kind = "cuda" if device.type == "cuda" else "cpu"
    flops, sizes = {}, {}
    for precision in PRECISIONS[kind]:
        n = 256
        try:
            while True:  # large enough to be timed well, small enough to be quick where a dtype is slow
                run = _matmul(device, precision, n)
                if _best(run, device, repeats=1) >= LONG_ENOUGH_S or n >= MATMUL_MAX[kind]:
                    break
                n *= 2
            flops[precision], sizes[precision] = 2.0 * n ** 3 / _best(run, device), n
        except (RuntimeError, TypeError, NotImplementedError, AttributeError) as e:  # not on this device or build
            log.info("peaks: no %s matmul here (%s)", precision, str(e).splitlines()[0][:100])
    elements = BANDWIDTH_MIB[kind] * 2 ** 20 // 4
    src = torch.rand(elements, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2.0 * src.numel() * 4 / _best(lambda: dst.copy_(src), device)
    return {"bandwidth_bytes_per_s": bandwidth, "flops_per_s": flops, "matmul_sizes": sizes,
            "how": f"best of {REPEATS}: a copy of {BANDWIDTH_MIB[kind]} MiB (read + write bytes), and an n x n linear "
                   f"layer on n tokens per precision (2 n^3 FLOPs, n in matmul_sizes); jobs/peaks.py"}


PRECISIONS = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "bf16", "fp16", "fp8", "int8")}


def _matmul(device: torch.device, precision: str, n: int):
    """A matmul of two n x n operands in ``precision``, as a thunk."""
    if precision in ("fp32", "bf16", "fp16"):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        x, weight = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        # A linear layer's layout (weight [out, in]): on a CPU without bf16 units torch.mm(a, b) in bf16 runs
        # ten times slower than F.linear, which is what a model calls.
        return lambda: torch.nn.functional.linear(x, weight)
    if precision == "fp8":
        if torch.cuda.get_device_capability(device) < (8, 9):
            raise RuntimeError("fp8 matmuls need compute capability 8.9 or later")
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm asks
        one = torch.ones((), device=device)
        return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    x = torch.randint(-8, 8, (n, n), device=device, dtype=torch.int8)
    y = torch.randint(-8, 8, (n, n), device=device, dtype=torch.int8)
    return lambda: torch._int_mm(x, y)


def _best(fn, device: torch.device, repeats: int = REPEATS) -> float:
    fn()  # warm-up: kernels chosen, memory touched
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def cpu_name() -> str:
    """The CPU's model name where Linux says it, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
