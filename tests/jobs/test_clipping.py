"""Activation-aware clipping: the chosen scales' output error on the calibration inputs is at most
the unclipped one's, for each kind of format."""

import pytest
import torch

from jobs.clipping import clip_scales
from jobs.config import DtypeConfig, MethodConfig
from kernels import formats


@pytest.mark.parametrize("fmt,granularity", [("int4", "per_group"), ("int4", "per_channel"), ("mxfp4", None),
                                             ("nvfp4", None), ("fp8_e4m3", "per_tensor")])
def test_clipped_scales_never_raise_the_output_error(fmt, granularity):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=gen)
    w[:, 5] *= 8  # an outlier column: clipping it costs little where its input is small
    x = torch.randn(400, 256, generator=gen) * torch.where(torch.arange(256) == 5, 0.05, 1.0)
    dtype_cfg = DtypeConfig(name=fmt, format=fmt, granularity=granularity or "per_block", group_size=128)
    scales, ratios = clip_scales(w, x.T @ x, dtype_cfg, MethodConfig(clip=True))
    knobs = {"granularity": granularity, "group_size": 128}
    clipped = formats.quantize(w, fmt, **knobs, scales=scales).dequantize()
    plain = formats.quantize(w, fmt, **knobs).dequantize()

    def error(q):
        return float(((x @ (w - q).T) ** 2).sum())

    assert error(clipped) <= error(plain)
    assert ((ratios >= 0.5) & (ratios <= 1)).all()
    if fmt == "int4":
        assert error(clipped) < 0.9 * error(plain) and (ratios < 1).any()
