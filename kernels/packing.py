"""Dense storage of sub-byte codes: 4-bit codes two per byte, 6-bit codes four per 3 bytes,
3-bit codes eight per 3 bytes.

Codes are unsigned bit patterns (uint8 holding ``width`` bits). Packing is over the
flattened tensor, element 0 in the lowest bits, little-endian: nibble i of byte j holds
element 2j+i; for 6 (3) bits, elements 4j..4j+3 (8j..8j+7) fill the 24 bits of bytes 3j..3j+2
from bit 0.
"""

from __future__ import annotations

import torch

PER_BYTES = {8: 1, 6: 4, 4: 2, 3: 8}  # elements per packing unit (1, 3, 1 and 3 bytes)


def pack(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Packed bytes; a last partial unit is padded with zero codes (``unpack`` drops them)."""
    if width not in PER_BYTES:
        raise ValueError(f"cannot pack codes of {width} bits; allowed widths: {', '.join(map(str, PER_BYTES))}")
    flat = codes.reshape(-1).to(torch.uint8)
    if width == 8:
        return flat
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % PER_BYTES[width]))
    if width == 4:
        return flat[0::2] | (flat[1::2] << 4)
    per_word = PER_BYTES[width]  # 24-bit words
    elements = flat.view(-1, per_word).to(torch.int32)
    word = elements[:, 0]
    for i in range(1, per_word):
        word = word | (elements[:, i] << (width * i))
    return torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], dim=1).reshape(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, width: int, numel: int) -> torch.Tensor:
    if width == 8:
        return packed[:numel]
    if width == 4:
        return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(-1)[:numel]
    triples = packed.view(-1, 3).to(torch.int32)
    word = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
    mask = 2 ** width - 1
    return torch.stack([(word >> (width * i)) & mask for i in range(PER_BYTES[width])],
                       dim=1).reshape(-1)[:numel].to(torch.uint8)
