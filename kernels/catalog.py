"""Names of formats, granularities and kernels, importable without torch.

The control plane validates configs against these before anything is submitted; the
numerics in ``kernels.formats`` and ``kernels.registry`` are built from the same lists.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IntFormat:
    name: str
    bits: int

    @property
    def qmax(self) -> int:
        # Symmetric range [-qmax, qmax]: the code -2**(bits-1) is unused, so 0 is exact
        # and negation is exact.
        return 2 ** (self.bits - 1) - 1


FORMATS = {f.name: f for f in (IntFormat("int8", 8), IntFormat("int4", 4))}
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
KERNELS = ("torch",)
