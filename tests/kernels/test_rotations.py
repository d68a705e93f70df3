import math

import pytest
import torch

from kernels.rotations import Rotation, hadamard_matrix, random_orthogonal

# 12, 20, 44 (q = 11, 19, 43) are Paley I; 28, 36, 148 (q = 13, 17, 73) Paley II; 768 = 12 * 64, 448 = 28 * 16.
ORDERS = (1, 2, 4, 8, 12, 16, 20, 28, 36, 44, 64, 148, 448, 768)


@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_orthonormal_with_entries_pm_inv_sqrt_n(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64 and h.device.type == "cpu"
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", (1, 2, 4, 32, 256))
def test_power_of_two_is_sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    assert torch.equal(hadamard_matrix(n).sign(), h)


def test_hadamard_returns_a_copy():
    hadamard_matrix(12).zero_()
    assert torch.allclose(hadamard_matrix(12).abs(), torch.full((12, 12), 1 / math.sqrt(12), dtype=torch.float64))


@pytest.mark.parametrize("n", (3, 6, 0))
def test_hadamard_unknown_order_raises(n):
    with pytest.raises(ValueError, match=f"order {n}"):
        hadamard_matrix(n)


def test_random_orthogonal():
    q = random_orthogonal(96, seed=1)
    assert q.dtype == torch.float64 and q.shape == (96, 96)
    assert torch.allclose(q @ q.T, torch.eye(96, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, random_orthogonal(96, seed=1))
    assert not torch.allclose(q, random_orthogonal(96, seed=2))


@pytest.mark.parametrize("kind", ("hadamard", "random"))
@pytest.mark.parametrize(("size", "block"), [(64, 0), (64, 16), (64, 32), (768, 0), (768, 16), (768, 32)])
def test_apply_matches_dense_block_diagonal(kind, size, block):
    rot = Rotation(kind, size, block, seed=3)
    m = rot.matrix()
    assert m.shape == (block or size,) * 2
    dense = torch.block_diag(*[m] * (size // (block or size)))
    x = torch.randn(2, 5, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = rot.apply(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert torch.allclose(y, x @ dense, rtol=0, atol=1e-12)
    assert torch.allclose(rot.apply(x, transpose=True), x @ dense.T, rtol=0, atol=1e-12)
    assert torch.allclose(rot.apply(y, transpose=True), x, rtol=0, atol=1e-12)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


def test_apply_half_precision_keeps_dtype_and_shape():
    x = torch.randn(3, 4, 768).to(torch.bfloat16)
    rot = Rotation("hadamard", 768, 32)
    y = rot.apply(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    ref = (x.float().reshape(3, 4, 24, 32) @ rot.matrix().float()).reshape(3, 4, 768).to(torch.bfloat16)
    assert torch.equal(y, ref)


def test_apply_wrong_last_dim_raises():
    with pytest.raises(ValueError, match="64"):
        Rotation("random", 64).apply(torch.randn(2, 32))


@pytest.mark.parametrize(("args", "match"), [(("hadamard", 64, 24), "block 24 does not divide 64"),
                                             (("random", 768, 40), "block 40 does not divide 768"),
                                             (("foo", 64), "foo"),
                                             (("hadamard", 96, 6), "order 6"),
                                             (("hadamard", 0), "size 0")])
def test_rotation_invalid_raises(args, match):
    with pytest.raises(ValueError, match=match):
        Rotation(*args)
