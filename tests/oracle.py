"""Shared helpers of the rule tests: seeded float64 tensors, the textbook stabiliser, comparison.

Independent of the library on purpose: expected values in the tests are computed with these and
plain torch, never with dynamiclrp's own code.
"""

import torch

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape: int, grad: bool = False) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=g, dtype=DT).requires_grad_(grad)


def stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    sign = torch.ones_like(z)
    sign[z < 0] = -1.0
    return z + eps * sign


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-8, atol: float = 1e-10):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
