"""Quantized models worth keeping: one quantized by a method that calibrates is stored under the
node's cache, so a sweep over kernels, bench settings or backends quantizes it once per node.

The key is everything that decides the codes: the model, the dtype, the quant scheme, the method
and its options, the calibration data, the seed, the hardware and the torch and transformers
versions (a GPU's reductions move the last bits of a Hessian). What is stored is every
quantized layer's packed codes and scales (safetensors) and, beside them, their formats,
shapes, static input scales and the layer rows with the time the method took; and where a
rotation or scaling rewrote the model, its other parameters (norms, embeddings, unquantized layers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from jobs.cache import cache_root, check_space, node_identity
from jobs.config import TrialConfig
from jobs.quantize import QuantizedLayers
from kernels.catalog import FORMATS
from kernels.formats import QuantizedTensor

TENSORS = "layers.safetensors"
PARAMS = "params.safetensors"  # the model's other parameters, where a transform changed them
MANIFEST = "quantized.json"  # written last: its presence says the folder is whole
PARTS = ("codes", "scales", "zero_points", "tensor_scale")


def folder(cfg: TrialConfig, device: torch.device) -> Path:
    identity = {"model": {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "name"},
                **{k: dataclasses.asdict(getattr(cfg, k)) for k in ("dtype", "quant", "method", "calib")},
                "seed": cfg.seed, **node_identity(device)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "quantized" / f"{cfg.model.name}-{cfg.dtype.name}-{cfg.method.name}-{digest}"


def save(out: Path, layers: QuantizedLayers, quantize_s: float) -> None:
    from safetensors.torch import save_file

    tensors, manifest = {}, {"layers": {}, "rows": layers.rows, "quantize_s": quantize_s}
    for name, q in layers.weights.items():
        entry = {"input_scale": layers.input_scales[name]}
        if q is not None:
            entry.update(format=q.spec.name, shape=list(q.shape), block=q.block)
            for part in PARTS:
                if getattr(q, part) is not None:
                    tensors[f"{name}.{part}"] = getattr(q, part).contiguous().cpu()
        manifest["layers"][name] = entry
    params = {name: p.contiguous().cpu() for name, p in layers.params.items()}
    check_space(out, sum(t.numel() * t.element_size() for t in [*tensors.values(), *params.values()]),
                "the quantized model", "delete older ones under quantized/")
    save_file(tensors, str(out / TENSORS))
    if params:
        save_file(params, str(out / PARAMS))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def load(where: Path, device: torch.device) -> tuple[QuantizedLayers, float]:
    """The stored layers, on ``device``, and the seconds the method took when they were made."""
    from safetensors.torch import load_file

    manifest = json.loads((where / MANIFEST).read_text())
    tensors = load_file(str(where / TENSORS), device=str(device))
    weights, scales = {}, {}
    for name, entry in manifest["layers"].items():
        scales[name] = entry["input_scale"]
        weights[name] = None
        if "format" in entry:
            if entry["format"] not in FORMATS:
                raise ValueError(f"{where / MANIFEST}: layer {name} has format {entry['format']!r}, not one of ours")
            parts = {p: tensors.get(f"{name}.{p}") for p in PARTS}
            weights[name] = QuantizedTensor(parts["codes"], parts["scales"], FORMATS[entry["format"]],
                                            torch.Size(entry["shape"]), int(entry["block"]), parts["zero_points"],
                                            parts["tensor_scale"])
    params = load_file(str(where / PARAMS), device=str(device)) if (where / PARAMS).exists() else {}
    return QuantizedLayers(weights, scales, manifest["rows"], params), float(manifest["quantize_s"])
