"""QuaRot's rotations (Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", 2024):
orthogonal matrices that leave the model's function unchanged and spread outlier channels over all
the others, so that a per-token or per-block scale fits every channel.

Where they go, as in QuaRot's ``rotation_utils``:

- the residual stream: every norm's gain is folded into the layers after it, then the embeddings
  and the outputs of o_proj and down_proj are rotated by Q, and the inputs of q/k/v, gate/up and
  lm_head by Q too (an RMSNorm without a gain commutes with an orthogonal Q);
- the down_proj input: the gated product cannot carry a rotation, so it is rotated online
  (``x @ R`` in the forward pass) and down_proj's weight absorbs R;
- each head's values: folded into v_proj's rows and o_proj's input columns;
- each head's queries and keys, online after RoPE, when the KV cache is quantized
  (``q k^T`` is unchanged by the same rotation of both).

``method.rotation`` picks Hadamard (kernels/rotations.py) or Haar-random matrices;
``method.rotation_size`` a full matrix (0) or a block-diagonal one of that block (MR-GPTQ's
block-wise Hadamard, Egiazarian et al. 2025), which must divide each rotated dimension. Heads
rotate by a block of ``min(rotation_size, head_dim)``, or the whole head. The folds are done in float64.
The online rotations are plain torch matmuls by the (block-diagonal) matrix, in every kernel's
path and in the benchmark's timing.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from jobs.config import MethodConfig
from jobs.decoder import decoder_layout, fold_norm
from kernels.catalog import Unsupported
from kernels.rotations import Rotation


class RotatedInputLinear(nn.Linear):
    """A linear layer whose input is rotated online first (QuaRot's down_proj); still an ``nn.Linear``,
    so the quantizing pass finds it by its name and calibrates on its rotated inputs."""

    input_rotation: Rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_rotation.apply(x), self.weight, self.bias)


def _rotation(method: MethodConfig, size: int, seed: int, what: str, block: Optional[int] = None) -> Rotation:
    block = method.rotation_size if block is None else block
    try:
        return Rotation(method.rotation, size, block, seed)
    except ValueError as e:
        raise Unsupported(f"method.rotation={method.rotation} method.rotation_size={method.rotation_size}: "
                          f"{what} ({size}): {e}") from None


def _rotate_in(linear: nn.Linear, rotation: Rotation) -> None:
    """The linear's input columns rotated: ``W <- W R``, so that it reads ``x R`` as it read ``x``."""
    linear.weight.copy_(rotation.apply(linear.weight.double()).to(linear.weight.dtype))


def _rotate_out(linear: nn.Linear, rotation: Rotation) -> None:
    """The linear's output rotated: ``W <- R^T W`` and ``b <- b R``."""
    linear.weight.copy_(rotation.apply(linear.weight.double().T).T.to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_(rotation.apply(linear.bias.double()).to(linear.bias.dtype))


@torch.no_grad()
def rotate(model: nn.Module, method: MethodConfig, seed: int) -> Rotation:
    """Rotate ``model`` in place as the module doc says; returns the heads' rotation, which a quantized
    KV cache applies online to queries and keys."""
    why = f"method.rotation={method.rotation}"
    decoder = decoder_layout(model, why)
    config = model.config
    if decoder.lm_head.weight is decoder.embed.weight:  # tied: lm_head takes the final norm's gain, not the embeddings
        decoder.lm_head.weight = nn.Parameter(decoder.embed.weight.detach().clone(), requires_grad=False)
        config.tie_word_embeddings = False
    residual = _rotation(method, config.hidden_size, seed, "the hidden size")
    heads_block = method.rotation_size if 0 < method.rotation_size < decoder.head_dim else 0
    head = _rotation(method, decoder.head_dim, seed + 1, "the head dimension", heads_block)
    intermediate = _rotation(method, decoder.blocks[0].down.in_features, seed + 2, "the MLP's intermediate size")
    embed = decoder.embed.weight
    embed.copy_(residual.apply(embed.double()).to(embed.dtype))
    for block in decoder.blocks:
        fold_norm(block.attn_norm, [block.q, block.k, block.v])
        fold_norm(block.mlp_norm, [block.gate, block.up])
        for linear in (block.q, block.k, block.v, block.gate, block.up):
            _rotate_in(linear, residual)
        for linear in (block.o, block.down):
            _rotate_out(linear, residual)
        values = Rotation(head.kind, decoder.num_kv_heads * decoder.head_dim, head.block or head.size, head.seed)
        _rotate_out(block.v, values)
        _rotate_in(block.o, Rotation(head.kind, decoder.num_heads * decoder.head_dim, values.block, head.seed))
        _rotate_in(block.down, intermediate)
        _rotate_input_online(model, block.down, intermediate)
    fold_norm(decoder.final_norm, [decoder.lm_head])
    _rotate_in(decoder.lm_head, residual)
    return head


def _rotate_input_online(model: nn.Module, linear: nn.Linear, rotation: Rotation) -> None:
    rotated = RotatedInputLinear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
    rotated.weight, rotated.bias = linear.weight, linear.bias
    rotated.input_rotation = rotation
    name = next(n for n, m in model.named_modules() if m is linear)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, rotated)
