"""Orthogonal rotations for QuaRot-style transforms: x -> x @ R with R a Hadamard or Haar-random matrix.

Hadamard matrices of order n = m * 2**k are built as kron(H_m, H_{2^k}):
- H_{2^k}: Sylvester's construction, H_{2n} = kron([[1, 1], [1, -1]], H_n) (the natural ordering).
- H_m, m = q + 1 for a prime q = 3 mod 4: Paley I, H = I + [[0, 1^T], [-1, Q]], Q the Jacobsthal matrix.
- H_m, m = 2(q + 1) for a prime q = 1 mod 4: Paley II, C = [[0, 1^T], [1, Q]] with 0 -> [[1, -1], [-1, -1]]
  and +-1 -> +-[[1, 1], [1, -1]].
QuaRot (Ashkboos et al. 2024) rotates LLM dimensions that are not powers of two the same way: a small Hadamard
times a power-of-two one (12, 20, 28 x 2^k). Matrices are orthonormal, float64 on the CPU; ``Rotation.apply`` casts.
"""

import functools
import math
from dataclasses import dataclass

import torch

_H2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley_q(m: int) -> tuple[int, int] | None:
    """(construction, q) when order m has a Paley construction, else None."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return 1, m - 1
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return 2, m // 2 - 1
    return None


def _decompose(n: int) -> tuple[int, int]:
    """(m, 2**k) with n = m * 2**k and H_m constructible, taking the smallest such m."""
    if n >= 1:
        m = n
        while m % 2 == 0:  # m runs over the odd part of n times 1, 2, 4, ...: increasing, n // m a power of two
            m //= 2
        while n % m == 0:
            if m in (1, 2) or _paley_q(m):
                return m, n // m
            m *= 2
    raise ValueError(f"no Hadamard matrix of order {n} is known here (m * 2**k, m in 1, 2, q+1 or 2(q+1) for Paley "
                     f"primes q); use a block size that has one (e.g. a power of two) or rotation=random")


def _paley(m: int) -> torch.Tensor:
    """The +-1 Paley matrix of order m (float64)."""
    kind, q = _paley_q(m)
    chi = -torch.ones(q, dtype=torch.float64)  # the quadratic character mod q, chi(0) = 0
    chi[torch.arange(1, q) ** 2 % q] = 1
    chi[0] = 0
    idx = torch.arange(q)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = -1 if kind == 1 else 1
    c[1:, 1:] = chi[(idx[None, :] - idx[:, None]) % q]  # Jacobsthal: Q[i, j] = chi(j - i)
    if kind == 1:
        return torch.eye(q + 1, dtype=torch.float64) + c
    # C is 0 exactly on its diagonal, so the block substitution is kron(C, A) + kron(I, B).
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, _H2) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@functools.lru_cache(maxsize=16)
def _hadamard(n: int) -> torch.Tensor:
    m, p = _decompose(n)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.kron(_H2, h)  # Sylvester
    small = h[:1, :1] if m == 1 else _H2 if m == 2 else _paley(m)
    # Scale the factors, not the product: one pass over the n x n result instead of two.
    return torch.kron(small / math.sqrt(m), h / math.sqrt(p))


def hadamard_matrix(n: int) -> torch.Tensor:
    """An n x n Hadamard matrix scaled to be orthonormal (H @ H.T == I), float64, on the CPU.
    n = m * 2**k where m is 1, 2, or the order of a Paley construction (q+1 for a prime q = 3 mod 4,
    2(q+1) for a prime q = 1 mod 4); built as kron(H_m, H_{2^k}) (Sylvester for the power of two).
    Raises ValueError naming n and saying no construction is known here (suggest a block size or rotation=random)."""
    return _hadamard(n).clone()  # a copy: callers may write to it, the cache must not change


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random n x n orthogonal matrix, float64 on the CPU, from a seeded torch.Generator (QR of a
    Gaussian matrix, columns' signs fixed by sign(diag(R)) so the distribution is Haar)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.where(r.diagonal() < 0, -1.0, 1.0)  # plain QR is not Haar: its sign convention biases Q


@functools.lru_cache(maxsize=16)
def _matrix(kind: str, b: int, seed: int) -> torch.Tensor:
    return _hadamard(b) if kind == "hadamard" else random_orthogonal(b, seed)


@functools.lru_cache(maxsize=8)
def _matrix_on(kind: str, b: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _matrix(kind, b, seed).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class Rotation:
    """x -> x @ R along the last dimension, R orthogonal n x n: a full matrix (block == 0) or block-diagonal
    with the same block x block matrix repeated n // block times (MR-GPTQ's block-wise Hadamard)."""
    kind: str  # "hadamard" or "random"
    size: int  # n, the dimension rotated
    block: int = 0  # 0: full; else the block size, which must divide size
    seed: int = 0  # random only

    def __post_init__(self):
        if self.kind not in ("hadamard", "random"):
            raise ValueError(f"rotation kind {self.kind!r} is not 'hadamard' or 'random'")
        if self.size < 1 or self.block < 0:
            raise ValueError(f"rotation size {self.size} must be >= 1 and block {self.block} >= 0")
        if self.block and self.size % self.block:
            raise ValueError(f"rotation block {self.block} does not divide {self.size}")
        if self.kind == "hadamard":
            _decompose(self.block or self.size)  # fail at config time, without building a large matrix

    def matrix(self) -> torch.Tensor:
        """The b x b float64 CPU matrix that is repeated (b = block or size); cached, so treat it as read-only."""
        return _matrix(self.kind, self.block or self.size, self.seed)

    def apply(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """x @ R (or x @ R.T) along x's last dimension (which must equal size), computed in x's dtype on x's
        device, except that float16/bfloat16 inputs are computed in float32 and cast back; float64 stays float64."""
        if x.shape[-1] != self.size:
            raise ValueError(f"last dimension {x.shape[-1]} != rotation size {self.size}")
        if not x.is_floating_point():
            raise TypeError(f"rotation needs a floating-point tensor, got {x.dtype}")
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        b = self.block or self.size
        m = _matrix_on(self.kind, b, self.seed, x.device, dtype)
        # Every b-long run of a row is rotated alike: one 2-D matmul over contiguous rows (a strided
        # view, such as a transposed weight, takes a slow path, seconds for a small float64 matrix).
        y = x.to(dtype).contiguous().reshape(-1, b) @ (m.T if transpose else m)
        return y.reshape(x.shape).to(x.dtype)
