"""An exactly solvable model for the samplers' tests: Gaussian data, whose eps is known in closed form."""

import math

import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import SpacedDiffusion, space_timesteps


def diffusion(schedule="linear", steps=1000, mean=gd.ModelMeanType.EPSILON, respacing=None, **kwargs):
    kwargs = dict(betas=gd.get_named_beta_schedule(schedule, steps), model_mean_type=mean,
                  model_var_type=kwargs.pop("var", gd.ModelVarType.FIXED_SMALL), loss_type=gd.LossType.MSE,
                  **kwargs)
    if respacing:
        return SpacedDiffusion(space_timesteps(steps, respacing), **kwargs)
    return gd.GaussianDiffusion(**kwargs)


class GaussianData:
    """Data x_0 ~ N(mu, diag(var)): its eps is known in closed form at every noise level.

    With y = x_t / alpha = x_0 + s eps, y ~ N(mu, var + s^2), so E[eps | x_t] =
    s (y - mu) / (var + s^2), and the probability-flow ODE moves y affinely:
    y(s1) = mu + sqrt((var + s1^2) / (var + s0^2)) (y(s0) - mu).
    """

    def __init__(self, diffusion, channels=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.schedule = diffusion.model_schedule
        self.mu = 0.5 * torch.randn(channels, dtype=torch.float64, generator=g)
        self.var = 0.05 + 0.5 * torch.rand(channels, dtype=torch.float64, generator=g)

    def __call__(self, x, t):
        alpha, sigma = self.schedule.alpha_sigma_at(t.double())
        s = (sigma / alpha).view(-1, 1)
        y = x / alpha.view(-1, 1)
        return s * (y - self.mu) / (self.var + s**2)

    def solution(self, noise, times):
        """The exact ODE from the first grid time to the last one, then the exact x_0 there
        (the solvers' last step maps the last grid point to its x_0 prediction)."""
        s0, s1 = (float(self.schedule.karras_sigma_at(torch.tensor(t))) for t in (times[0], times[-1]))
        y0 = noise * math.sqrt(1 + s0**2)
        y1 = self.mu + torch.sqrt((self.var + s1**2) / (self.var + s0**2)) * (y0 - self.mu)
        return self.mu + self.var / (self.var + s1**2) * (y1 - self.mu)
