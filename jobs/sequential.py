"""Walk a model's linear layers in model order on calibration data, each seeing the inputs it
gets once the layers before it are quantized: what GPTQ and static activation scales calibrate on.

As GPTQ's reference and llm-compressor's sequential pipeline do, the inputs of the first decoder
block are caught once, and each block is run on the cached inputs of the block before it:
the model runs about once per block, not once per layer. Inside a block, layers that read the
same input (q, k and v; gate and up) form a group calibrated together; a group's inputs are
gathered by running the block up to it, then ``finish(group, inputs)`` quantizes the group in
place (it must replace the layers) before the next group is reached. Layers outside the
blocks (``lm_head``, if not skipped) are calibrated last, through the whole model. A model with
no block list is calibrated through the whole model, layer group by layer group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

MAX_SAMPLE = 1 << 20  # |x| values kept per layer for the percentile and MSE observers


class _Stop(Exception):
    """Ends a forward pass once the layer being calibrated has its input."""


@dataclass
class LayerInputs:
    """What one group of layers read on the calibration data."""
    xtx: torch.Tensor          # sum of x^T x over tokens, fp32 [in, in]
    tokens: int = 0
    amax: float = 0.0          # largest |x|
    channel_amax: Optional[torch.Tensor] = None    # largest |x| per input channel (SmoothQuant)
    channel_abs_sum: Optional[torch.Tensor] = None  # sum of |x| per input channel (AWQ)
    sample: list[torch.Tensor] = field(default_factory=list)  # |x| values, a seeded sample of them

    @property
    def hessian(self) -> torch.Tensor:
        """The inputs' second moment X^T X / tokens (GPTQ's Hessian up to a factor 2)."""
        return self.xtx / max(self.tokens, 1)

    def absolute_values(self) -> torch.Tensor:
        return torch.cat(self.sample)


class _Collector:
    def __init__(self, features: int, device: torch.device, sample_per_batch: int, seed: int):
        self.inputs = LayerInputs(torch.zeros(features, features, device=device))
        self.sample_per_batch = sample_per_batch
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        rotation = getattr(module, "input_rotation", None)  # an online rotation (jobs/rotation.py) comes first
        x = (x if rotation is None else rotation.apply(x)).reshape(-1, x.shape[-1]).float()
        inputs, magnitude = self.inputs, x.abs()
        inputs.xtx += x.T @ x
        inputs.tokens += x.shape[0]
        channel_amax, channel_sum = magnitude.amax(dim=0), magnitude.sum(dim=0)
        inputs.amax = max(inputs.amax, float(channel_amax.max()))
        if inputs.channel_amax is None:
            inputs.channel_amax, inputs.channel_abs_sum = channel_amax, channel_sum
        else:
            inputs.channel_amax = torch.maximum(inputs.channel_amax, channel_amax)
            inputs.channel_abs_sum += channel_sum
        if self.sample_per_batch:
            flat = magnitude.reshape(-1)
            pick = torch.randint(0, flat.numel(), (min(self.sample_per_batch, flat.numel()),), generator=self.gen)
            inputs.sample.append(flat[pick.to(flat.device)].cpu())
        raise _Stop


def _run_each(run: Callable[[int], None], batches: int) -> None:
    """``run(b)`` for every batch, each until a hook stops it (or to its end)."""
    with torch.no_grad():
        for b in range(batches):
            try:
                run(b)
            except _Stop:
                pass


def decoder_blocks(model: nn.Module) -> Optional[nn.ModuleList]:
    """The module list holding most of the model's linear layers (a decoder's blocks), if any."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    count = lambda m: sum(isinstance(x, nn.Linear) for x in m.modules())  # noqa: E731
    return max(lists, key=count, default=None)


def _groups(run_once: Callable[[], None], layers: list[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    """``layers`` in the order a forward pass reaches them, grouped by the input tensor they share;
    layers the pass never reaches come last, one per group."""
    seen: list[tuple[torch.Tensor, list]] = []

    def hook(name, module):
        def record(_, args):
            for x, group in seen:
                if x is args[0]:
                    group.append((name, module))
                    return
            seen.append((args[0], [(name, module)]))
        return record

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in layers]
    try:
        with torch.no_grad():
            run_once()
    finally:
        for h in handles:
            h.remove()
    groups = [group for _, group in seen]
    reached = {n for group in groups for n, _ in group}
    return groups + [[(n, m)] for n, m in layers if n not in reached]


def _calibrate_stage(run: Callable[[int], None], batches: int, layers: list[tuple[str, nn.Module]],
                     finish: Callable[[list[tuple[str, nn.Module]], Optional[LayerInputs]], None],
                     sample: int, seed: int) -> None:
    for group in _groups(lambda: run(0), layers):
        first = group[0][1]
        collector = _Collector(first.in_features, first.weight.device, sample // batches if sample else 0, seed)
        handle = first.register_forward_pre_hook(collector)
        try:
            _run_each(run, batches)
        finally:
            handle.remove()
        finish(group, collector.inputs if collector.inputs.tokens else None)


def calibrate(model: nn.Module, windows: torch.Tensor, batch_size: int, layers: list[tuple[str, nn.Linear]],
              finish: Callable[[list[tuple[str, nn.Module]], Optional[LayerInputs]], None],
              keep_sample: bool = False, seed: int = 0) -> None:
    """Call ``finish`` on every group of ``layers`` in model order with its calibration inputs
    (None for a layer no calibration input reaches); ``windows`` are token ids [n, seq_len]."""
    device = next(model.parameters()).device
    batches = [w.to(device) for w in windows.split(batch_size)]
    sample = MAX_SAMPLE if keep_sample else 0
    blocks = decoder_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    in_block = [] if blocks is None else [[(n, m) for n, m in layers if n.startswith(names[id(b)] + ".")]
                                          for b in blocks]
    if blocks is not None and any(in_block):
        cached = _block_inputs(model, blocks[0], batches)
        for block, block_layers in zip(blocks, in_block):
            if block_layers:
                _calibrate_stage(lambda b: block(*cached[b][0], **cached[b][1]), len(batches), block_layers,
                                 finish, sample, seed)
            with torch.no_grad():
                for b, (args, kwargs) in enumerate(cached):
                    out = block(*args, **kwargs)
                    cached[b] = ((out[0] if isinstance(out, (tuple, list)) else out, *args[1:]), kwargs)
    done = {n for group in in_block for n, _ in group}
    rest = [(n, m) for n, m in layers if n not in done]
    if rest:
        _calibrate_stage(lambda b: model(batches[b], use_cache=False), len(batches), rest, finish, sample, seed)


def _block_inputs(model: nn.Module, first_block: nn.Module, batches: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first block is called with, per batch."""
    caught: list[tuple[tuple, dict]] = []

    def catch(_, args, kwargs):
        caught.append((args, kwargs))
        raise _Stop

    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        _run_each(lambda b: model(batches[b], use_cache=False), len(batches))
    finally:
        handle.remove()
    return caught
