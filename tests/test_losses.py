"""Specifications of guided_diffusion.losses."""

import math

import pytest
import torch

from guided_diffusion.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl


def test_kl_of_identical_gaussians_is_zero():
    m, lv = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(normal_kl(m, lv, m, lv), torch.zeros(4, 5, dtype=torch.float64))


def test_kl_matches_the_closed_form_for_scalars():
    m1, v1, m2, v2 = 0.3, 0.5, -0.2, 2.0
    expected = math.log(math.sqrt(v2) / math.sqrt(v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
    got = normal_kl(torch.tensor(m1, dtype=torch.float64), math.log(v1), m2, math.log(v2))
    assert abs(got.item() - expected) < 1e-12


def test_kl_is_nonnegative_and_broadcasts():
    g = torch.Generator().manual_seed(0)
    m1, lv1 = torch.randn(3, 1, generator=g), torch.randn(3, 4, generator=g)
    out = normal_kl(m1, lv1, torch.randn(1, 4, generator=g), 0.0)
    assert out.shape == (3, 4) and (out >= 0).all()


def test_kl_without_any_tensor_says_what_to_do():
    with pytest.raises(TypeError, match="torch.tensor"):
        normal_kl(0.0, 0.0, 1.0, 1.0)


def test_cdf_is_monotone_symmetric_and_bounded():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    c = approx_standard_normal_cdf(x)
    assert (c.diff() >= 0).all() and c[0] >= 0 and c[-1] <= 1
    torch.testing.assert_close(c + c.flip(0), torch.ones_like(c))
    assert abs(approx_standard_normal_cdf(torch.tensor(1.0, dtype=torch.float64)).item() - 0.8413447) < 2e-4


def test_discretized_likelihood_sums_to_one_over_the_256_bins():
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    for mean, log_scale in [(0.1, -2.0), (-0.9, -4.0), (0.95, 0.0)]:
        logp = discretized_gaussian_log_likelihood(
            grid, means=torch.full_like(grid, mean), log_scales=torch.full_like(grid, log_scale)
        )
        assert abs(logp.exp().sum().item() - 1.0) < 1e-6


def test_degenerate_scale_gives_a_finite_penalty():
    x = torch.tensor([0.0, 0.5])
    logp = discretized_gaussian_log_likelihood(x, means=x + 0.5, log_scales=torch.full_like(x, -12.0))
    assert torch.isfinite(logp).all() and (logp <= math.log(1e-12) + 1e-3).all()


def test_shape_mismatch_names_the_shapes():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\(2, 3\), \(1, 3\), \(2, 3\)"):
        discretized_gaussian_log_likelihood(x, means=x[:1], log_scales=x)
