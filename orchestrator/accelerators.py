"""Named accelerators for what-if predictions: memory bandwidth and dense peak matmul throughput per
precision, from their makers' datasheets (per GPU, SXM/OAM parts, without 2:4 sparsity, which datasheets
often quote as the headline: those figures are halved here). A precision not listed is not computed
natively: a format in it runs dequantized, at the compute dtype's rate (``jobs.perf_model.Peaks``).

fp32 is the CUDA-core (vector) rate, as torch computes fp32 matmuls with TF32 off (its default).
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.perf_model import Peaks

TB, TF = 1e12, 1e12


@dataclass(frozen=True)
class Accelerator:
    name: str
    bandwidth: float  # bytes/s
    flops: dict[str, float]  # precision -> dense FLOP/s (int8: OP/s)
    source: str

    def peaks(self) -> Peaks:
        return Peaks(self.bandwidth, self.flops, native=tuple(self.flops))


_HOPPER = {"fp32": 67 * TF, "bf16": 989.4 * TF, "fp16": 989.4 * TF, "fp8": 1978.9 * TF, "int8": 1978.9 * TF}

ACCELERATORS = (
    Accelerator("A100-SXM-80GB", 2.039 * TB, {"fp32": 19.5 * TF, "bf16": 312 * TF, "fp16": 312 * TF,
                                               "int8": 624 * TF},
                "NVIDIA A100 Tensor Core GPU datasheet (2021): 2,039 GB/s HBM2e; FP32 19.5 TF; BF16/FP16 Tensor "
                "312 TF; INT8 Tensor 624 TOPS (dense)"),
    Accelerator("H100-SXM", 3.35 * TB, dict(_HOPPER),
                "NVIDIA H100 Tensor Core GPU datasheet (2023), SXM: 3.35 TB/s HBM3; FP32 67 TF; BF16/FP16 1,979 TF, "
                "FP8 3,958 TF, INT8 3,958 TOPS with sparsity (halved here)"),
    Accelerator("H200-SXM", 4.8 * TB, dict(_HOPPER),
                "NVIDIA H200 Tensor Core GPU datasheet (2024), SXM: 4.8 TB/s HBM3e; the H100 SXM's compute (FP32 "
                "67 TF; BF16/FP16 1,979 TF, FP8 and INT8 3,958 with sparsity)"),
    Accelerator("B200-HGX", 8.0 * TB, {"fp32": 80 * TF, "bf16": 2250 * TF, "fp16": 2250 * TF, "fp8": 4500 * TF,
                                       "fp6": 4500 * TF, "fp4": 9000 * TF, "int8": 4500 * TF},
                "NVIDIA Blackwell datasheet, HGX B200 per GPU at 1,000 W: 8 TB/s HBM3e; FP32 80 TF; BF16/FP16 4.5 "
                "PF, FP8/FP6 9 PF, FP4 18 PF, INT8 9 POPS with sparsity (halved here)"),
    Accelerator("MI300X", 5.3 * TB, {"fp32": 163.4 * TF, "bf16": 1307.4 * TF, "fp16": 1307.4 * TF,
                                     "fp8": 2614.9 * TF, "int8": 2614.9 * TF},
                "AMD Instinct MI300X data sheet (2023): 5.3 TB/s HBM3; FP32 matrix 163.4 TF; BF16/FP16 1,307.4 TF; "
                "FP8 2,614.9 TF; INT8 2,614.9 TOPS (dense)"),
)


WHATIF_COLUMNS = ("trial", "accelerator", "prefill_tokens_per_s", "prefill_bound", "decode_tokens_per_s",
                  "decode_bound", "emulated")


def whatif(label: str, params: dict[str, str], metrics: dict[str, float]) -> list[dict]:
    """A trial's bench predicted on every accelerator from the costs it logged: prefill and decode tokens/s,
    the bound, and whether a format in it is not native there (computed dequantized, at the compute dtype's
    rate). Empty for a trial that logged no costs."""
    from jobs.perf_model import PRECISION, Cost, roofline

    prefill, decode = Cost.from_metrics(metrics, "prefill"), Cost.from_metrics(metrics, "decode")
    compute = params.get("dtype.compute_dtype", "auto")
    fallback = PRECISION.get(params.get("model.dtype", "") if compute == "auto" else compute)
    try:
        batch, prompt = int(params["bench.batch_size"]), int(params["bench.prompt_len"])
    except (KeyError, ValueError):
        return []
    if prefill is None or decode is None or fallback is None:
        return []
    out = []
    for acc in ACCELERATORS:
        first, step = roofline(prefill, acc.peaks(), fallback), roofline(decode, acc.peaks(), fallback)
        out.append({"trial": label, "accelerator": acc.name, "prefill_tokens_per_s": batch * prompt / first.seconds,
                    "prefill_bound": first.bound, "decode_tokens_per_s": batch / step.seconds,
                    "decode_bound": step.bound, "emulated": first.emulated or step.emulated})
    return out


def by_name(name: str) -> Accelerator:
    """The accelerator a name (or Ray accelerator type: H100, A100, ...) means; KeyError if none."""
    for acc in ACCELERATORS:
        if acc.name == name or acc.name.split("-")[0] == name:
            return acc
    raise KeyError(name)
