"""The parts of a Llama-style decoder that function-preserving transforms rewrite, and the two edits
they are made of: folding a norm's gain into the layers after it, and moving a per-channel scale
from one op into the layers that read its output.

Llama, Mistral and Qwen2 name their parts alike (``model.embed_tokens``, ``model.layers[i]`` with
``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``,
``mlp.{gate,up,down}_proj``, then ``model.norm`` and ``lm_head``); another architecture is refused
with what was missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.catalog import Unsupported

PROJECTIONS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@dataclass
class Block:
    attn_norm: nn.Module
    mlp_norm: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


@dataclass
class Decoder:
    embed: nn.Embedding
    blocks: list[Block]
    final_norm: nn.Module
    lm_head: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int


def decoder_layout(model: nn.Module, why: str) -> Decoder:
    """``model``'s parts; raises Unsupported, saying ``why`` they are needed, if it is not Llama-style."""
    try:
        inner, config = model.model, model.config
        blocks = [Block(layer.input_layernorm, layer.post_attention_layernorm,
                        **{k: layer.get_submodule(path) for k, path in PROJECTIONS.items()}) for layer in inner.layers]
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        decoder = Decoder(inner.embed_tokens, blocks, inner.norm, model.lm_head, heads,
                          getattr(config, "num_key_value_heads", None) or heads, head_dim)
    except AttributeError as e:
        raise Unsupported(f"{why} needs a Llama-style decoder ({type(model).__name__} lacks {e.name or e})") from None
    for block in blocks:
        for norm in (block.attn_norm, block.mlp_norm):
            if getattr(norm, "bias", None) is not None:
                raise Unsupported(f"{why} needs RMSNorm layers without a bias ({type(norm).__name__} has one)")
    return decoder


@torch.no_grad()
def fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """The norm's gain moved into the input columns of the linear layers reading it; its gain becomes 1."""
    gain = norm.weight.double()
    for linear in readers:
        linear.weight.copy_(linear.weight.double() * gain)
    norm.weight.fill_(1.0)


@torch.no_grad()
def move_scales(source: nn.Module, readers: list[nn.Linear], scales: torch.Tensor) -> None:
    """Channel j of ``source``'s output divided by ``scales[j]`` and the readers' input column j multiplied
    by it: the readers' outputs are unchanged. ``source`` is a norm (its gain) or a linear layer (its rows)."""
    s = scales.double().to(source.weight.device)
    if isinstance(source, nn.Linear):
        source.weight.copy_(source.weight.double() / s[:, None])
        if source.bias is not None:
            source.bias.copy_(source.bias.double() / s)
    else:
        source.weight.copy_(source.weight.double() / s)
    for linear in readers:
        linear.weight.copy_(linear.weight.double() * s)
