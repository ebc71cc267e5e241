import pytest
import torch

import sparse_linear_attn as sla


def test_relative_error_definition():
    exact = torch.tensor([[3.0, 4.0]])  # norm 5
    approx = torch.tensor([[3.0, 5.0]])  # diff norm 1
    err = sla.relative_error(approx, exact)
    assert err.dtype == torch.float64 and float(err) == pytest.approx(0.2, rel=1e-12)


def test_relative_error_is_float64_even_for_bf16():
    exact = torch.ones(1000, dtype=torch.bfloat16)
    approx = exact.clone()
    approx[0] = 2.0
    assert float(sla.relative_error(approx, exact)) == pytest.approx(1 / 1000**0.5, rel=1e-9)


def test_relative_error_per_head():
    exact = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    approx = exact.clone()
    approx[1, 2] *= 1.5  # only one (batch, head) is off, by 50 %
    err = sla.relative_error(approx, exact, per_head=True)
    assert err.shape == (2, 3)
    assert float(err[1, 2]) == pytest.approx(0.5, rel=1e-12)
    assert float(err.sum() - err[1, 2]) == 0.0


def test_relative_error_zero_reference_and_shape_mismatch():
    z = torch.zeros(3)
    assert float(sla.relative_error(z, z)) == 0.0
    assert float(sla.relative_error(torch.ones(3), z)) == float("inf")
    with pytest.raises(ValueError, match="one shape"):
        sla.relative_error(torch.ones(3), torch.ones(4))
