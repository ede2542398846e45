"""The schedule view: float64 logSNR / alpha / sigma tables and the continuous-time maps."""

import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.schedule import ScheduleView


@pytest.fixture(params=[("cosine", 1000), ("linear", 1000), ("cosine", 50)], ids=lambda p: f"{p[0]}{p[1]}")
def view(request):
    name, steps = request.param
    return ScheduleView(np.cumprod(1 - gd.get_named_beta_schedule(name, steps)))


def test_tables_are_float64_and_consistent(view):
    abar = view.alphas_cumprod
    for table in (view.alpha, view.sigma, view.logsnr, view.karras_sigma):
        assert table.dtype == np.float64 and table.shape == abar.shape
    np.testing.assert_allclose(view.alpha**2 + view.sigma**2, 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(np.exp(view.logsnr), abar / (1 - abar), rtol=1e-12)
    np.testing.assert_allclose(view.karras_sigma, view.sigma / view.alpha, rtol=1e-12)
    assert np.all(np.diff(view.logsnr) < 0)


def test_integer_timesteps_hit_the_tables_exactly(view):
    t = torch.arange(view.num_timesteps)
    assert torch.equal(view.logsnr_at(t), torch.from_numpy(view.logsnr))
    assert torch.equal(view.logsnr_at(t.double()), torch.from_numpy(view.logsnr))
    assert torch.equal(view.t_at_logsnr(torch.from_numpy(view.logsnr)), t.double())
    np.testing.assert_allclose(view.karras_sigma_at(t).numpy(), view.karras_sigma, rtol=1e-13)
    np.testing.assert_allclose(view.t_at_karras_sigma(view.karras_sigma).numpy(), t.numpy(), rtol=0, atol=1e-9)
    alpha, sigma = view.alpha_sigma_at(t)
    np.testing.assert_allclose(alpha.numpy(), view.alpha, rtol=1e-13)
    np.testing.assert_allclose(sigma.numpy(), view.sigma, rtol=1e-13)


def test_fractional_timesteps_are_linear_in_log_sigma(view):
    k = torch.arange(view.num_timesteps - 1).double()
    for frac in (0.25, 0.5, 0.9):
        log_sigma = torch.log(view.karras_sigma_at(k + frac))
        expected = (1 - frac) * np.log(view.karras_sigma[:-1]) + frac * np.log(view.karras_sigma[1:])
        np.testing.assert_allclose(log_sigma.numpy(), expected, rtol=1e-11, atol=1e-11)


def test_time_to_logsnr_round_trips(view):
    t = torch.linspace(0, view.num_timesteps - 1, 997, dtype=torch.float64)
    np.testing.assert_allclose(view.t_at_logsnr(view.logsnr_at(t)).numpy(), t.numpy(), rtol=0, atol=1e-8)
    sigma = view.karras_sigma_at(t)
    np.testing.assert_allclose(view.t_at_karras_sigma(sigma).numpy(), t.numpy(), rtol=0, atol=1e-8)


def test_noise_levels_beyond_the_chain_clamp_to_its_ends(view):
    last = view.num_timesteps - 1
    got = view.t_at_logsnr(torch.tensor([view.logsnr[0] + 5, view.logsnr[-1] - 5], dtype=torch.float64))
    assert got.tolist() == [0.0, float(last)]


def test_timesteps_outside_the_chain_are_refused(view):
    with pytest.raises(ValueError, match=r"must lie in \[0, "):
        view.logsnr_at(torch.tensor([view.num_timesteps - 0.5]))


def test_the_diffusion_carries_its_view_and_gathers_its_tables():
    d = SpacedDiffusion(
        space_timesteps(1000, "ddim50"), betas=gd.get_named_beta_schedule("cosine", 1000),
        model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.FIXED_SMALL,
        loss_type=gd.LossType.MSE,
    )
    np.testing.assert_array_equal(d.schedule.alphas_cumprod, d.alphas_cumprod)
    t = torch.tensor([0, 17, 49])
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    for name in ("logsnr", "alpha", "sigma"):
        expected = torch.from_numpy(getattr(d.schedule, name)[t.numpy()]).view(-1, 1, 1, 1).expand_as(x)
        assert torch.equal(d._coef(name, t, x), expected)
    np.testing.assert_array_equal(d.schedule.alpha, d.sqrt_alphas_cumprod)
    np.testing.assert_array_equal(d.schedule.sigma, d.sqrt_one_minus_alphas_cumprod)
