import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def edge_values(n: int, seed: int, spread: tuple[int, int] = (-30, 20)) -> torch.Tensor:
    """fp32 values over many binades, with ±0, subnormals, ties of every grid, huge, Inf and NaN."""
    gen = torch.Generator().manual_seed(seed)
    mant = torch.rand(n, generator=gen) + 1
    exps = torch.randint(*spread, (n,), generator=gen)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    x = sign * torch.ldexp(mant, exps)
    # Exact ties: odd multiples of 2**-k sit halfway between neighbours on many grids.
    ties = (2 * torch.randint(0, 64, (n // 4,), generator=gen) + 1).float() * torch.ldexp(
        torch.ones(n // 4), torch.randint(-20, 12, (n // 4,), generator=gen))
    specials = torch.tensor([0.0, -0.0, 2.0 ** -149, -(2.0 ** -140), 2.0 ** -126, 1e30, -1e30,
                             float("inf"), -float("inf"), float("nan"), 448.0, 464.0, 470.0, 480.0,
                             57344.0, 61440.0, 61439.0, 6.0, 7.0, 7.5, 7.75, 28.0, 30.0])
    return torch.cat([x, ties, -ties, specials])


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.isnan(a), torch.isnan(b)) and bits_equal(torch.nan_to_num(a), torch.nan_to_num(b))
