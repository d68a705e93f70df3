"""Per-channel scales moved from activations into weights: SmoothQuant, AWQ, and planted outliers.

Each moves a scale ``s_j`` per input channel of a group of linear layers that read one op's output:
the op's output channel j is divided by it (a norm's gain, or a linear's row) and the layers' input
column j multiplied by it (``jobs.decoder.move_scales``), which leaves the model's function unchanged.
The mappings are those of the methods' reference code for Llama: SmoothQuant's (the smoothquant
repository's ``smooth_lm``, llm-compressor's default) are the norms before q/k/v and gate/up; AWQ's
(llm-awq's ``auto_scale``) add v_proj before o_proj (where every head has its own values) and up_proj
before down_proj.

- SmoothQuant (Xiao et al., ICML 2023): ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``.
- AWQ (Lin et al., MLSys 2024): ``s = mean|X|^a``, normalised by ``sqrt(max s * min s)``, for ``a`` on
  a grid from 0 (the identity) up; the one whose quantized layers have the least output error on the
  calibration inputs is kept. llm-awq measures the error at the output of the attention or MLP block by
  running it per grid point; here it is each layer's, exactly, from the inputs' second moment
  (``tr(dW H dW^T)`` summed over the group), which needs no forward pass per point.

Scales are searched on the unquantized model's calibration inputs (as llm-awq and SmoothQuant do),
in model order, each group seeing the inputs the groups before it give after their scaling.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from jobs.config import MethodConfig, OutlierPlant
from jobs.decoder import Decoder, decoder_layout, move_scales
from jobs.gptq import weighted_error
from jobs.sequential import LayerInputs, calibrate

Mapping = tuple[nn.Module, list[nn.Linear]]  # an op, and the linear layers reading its output


def mappings(decoder: Decoder, scaling: str) -> list[Mapping]:
    found: list[Mapping] = []
    for b in decoder.blocks:
        found += [(b.attn_norm, [b.q, b.k, b.v]), (b.mlp_norm, [b.gate, b.up])]
        if scaling == "awq":
            found += [(b.v, [b.o])] if decoder.num_heads == decoder.num_kv_heads else []
            found += [(b.up, [b.down])]
    return found


def smoothquant_scales(channel_amax: torch.Tensor, readers: list[nn.Linear], alpha: float) -> torch.Tensor:
    weight_amax = torch.stack([r.weight.detach().abs().amax(dim=0).float() for r in readers]).amax(dim=0)
    x = channel_amax.to(weight_amax.device).clamp(min=1e-5)
    return (x.pow(alpha) / weight_amax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


Dequantize = Callable[[torch.Tensor], torch.Tensor]  # a weight rounded to its layer's format and back


def awq_search(readers: list[tuple[nn.Linear, Dequantize]], inputs: LayerInputs,
               grid: int) -> tuple[torch.Tensor, float, list[float]]:
    """(the chosen scales, their exponent ``a``, the objective at every grid point, identity first) for
    the layers reading ``inputs``, each with its own rounding (layers may differ in format)."""
    hessian = inputs.hessian.to(readers[0][0].weight.device)
    mean = (inputs.channel_abs_sum / max(inputs.tokens, 1)).to(hessian.device)
    errors, candidates = [], []
    for step in range(grid):
        a = step / grid
        s = mean.pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        error = sum(weighted_error(r.weight, dequantize(r.weight.float() * s) / s, hessian)
                    for r, dequantize in readers)
        errors.append(float(error))
        candidates.append((s, a))
    best = min(range(grid), key=lambda i: errors[i])  # ties keep the identity
    return candidates[best][0], candidates[best][1], errors


def scale_model(model: nn.Module, windows: torch.Tensor, method: MethodConfig, batch_size: int, seed: int,
                dequantizers: dict[str, Dequantize]) -> dict[str, dict]:
    """Apply ``method.scaling`` to ``model`` in place on calibration ``windows``; returns, per layer
    whose input was scaled, what was chosen (for the layer record). ``dequantizers`` rounds the weight
    of each layer whose weights will be quantized, in its format: AWQ's objective is theirs."""
    decoder = decoder_layout(model, f"method.scaling={method.scaling}")
    names = {id(m): n for n, m in model.named_modules()}
    found = {id(readers[0]): (source, readers) for source, readers in mappings(decoder, method.scaling)}
    layers = [(names[id(r)], r) for _, readers in found.values() for r in readers]
    notes: dict[str, dict] = {}

    def finish(group: list[tuple[str, nn.Module]], inputs) -> None:
        source, readers = next(found[id(m)] for _, m in group if id(m) in found)
        if inputs is None:
            return
        if method.scaling == "smoothquant":
            s = smoothquant_scales(inputs.channel_amax, readers, method.smoothquant.alpha)
            note = {"smoothquant_scale_max": float(s.max()), "smoothquant_scale_min": float(s.min())}
        else:
            targets = [(r, dequantizers[names[id(r)]]) for r in readers if names[id(r)] in dequantizers]
            if not targets:
                return
            s, a, errors = awq_search(targets, inputs, method.awq.grid)
            chosen = min(errors)
            note = {"awq_alpha": a, "awq_gain": errors[0] / chosen if chosen > 0 else 1.0}
        move_scales(source, readers, s)
        notes.update({names[id(r)]: note for r in readers})

    calibrate(model, windows, batch_size, layers, finish, seed=seed)
    return notes


def plant_outliers(model: nn.Module, plant: OutlierPlant) -> None:
    """Plant ``plant.channels`` outlier channels in the residual stream's norms and in the MLP's
    intermediate activations, by function-preserving rescales (see ``OutlierPlant``)."""
    decoder = decoder_layout(model, "model.outliers")
    gen = torch.Generator().manual_seed(plant.seed)

    def scales(size: int) -> torch.Tensor:
        if plant.channels > size:
            raise ValueError(f"model.outliers.channels={plant.channels}: more than the {size} channels there are")
        s = torch.ones(size, dtype=torch.float64)
        s[torch.randperm(size, generator=gen)[:plant.channels]] = 1 / plant.scale
        return s

    residual, intermediate = scales(decoder.embed.embedding_dim), scales(decoder.blocks[0].down.in_features)
    for b in decoder.blocks:
        move_scales(b.attn_norm, [b.q, b.k, b.v], residual)
        move_scales(b.mlp_norm, [b.gate, b.up], residual)
        move_scales(b.up, [b.down], intermediate)
