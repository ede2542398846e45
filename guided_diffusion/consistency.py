"""Sampling networks trained in the Karras-denoiser parameterisation: consistency models and their EDM teachers.

OpenAI's consistency models (Song et al. 2023, "Consistency Models") and the EDM
teachers they were distilled from use the ADM UNet F as the inner network of a
denoiser over the variance-exploding state x = x_0 + sigma * eps (Karras et al. 2022,
eq. 7):

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, 250 ln sigma),
    c_in = 1 / sqrt(sigma^2 + sigma_data^2), sigma_data = 0.5,

with EDM's c_skip = sigma_data^2 / (sigma^2 + sigma_data^2) and c_out = sigma sigma_data /
sqrt(sigma^2 + sigma_data^2) for the teachers, and the boundary-condition scalings of the
consistency models (Song et al. 2023, appendix C), c_skip = sigma_data^2 /
((sigma - sigma_min)^2 + sigma_data^2) and c_out = (sigma - sigma_min) sigma_data /
sqrt(sigma^2 + sigma_data^2), so that D(x, sigma_min) = x.

Samplers: ``cm_onestep`` (Song et al. 2023, alg. 1 with one step) and ``cm_multistep``
(alg. 1 at the points ``ts`` of the rho = 7 Karras grid), and every solver of
``guided_diffusion.solvers`` (Heun, DPM-Solver++, ...) over this denoiser (`solve`).
"""

import numpy as np
import torch

from . import solvers
from .errors import usage

SIGMA_DATA = 0.5   # standard deviation of the data the preconditioning assumes
SIGMA_MIN = 0.002  # the lowest noise level of training (the boundary, where D(x) = x)
SIGMA_MAX = 80.0   # the highest noise level, where sampling starts
RHO = 7.0          # exponent of the Karras noise-level grid
TIME_SCALE = 250.0  # the network's time input is TIME_SCALE * ln(sigma)

PRECONDITIONINGS = ("edm", "consistency")
CM_SAMPLERS = ("cm_onestep", "cm_multistep")


def scalings(sigma, preconditioning):
    """(c_skip, c_out, c_in) at noise levels ``sigma`` (float64 tensor) for "edm" or "consistency"."""
    total = sigma**2 + SIGMA_DATA**2
    c_in = torch.rsqrt(total)
    if preconditioning == "edm":
        return SIGMA_DATA**2 / total, sigma * SIGMA_DATA * c_in, c_in
    if preconditioning == "consistency":
        shifted = sigma - SIGMA_MIN
        return SIGMA_DATA**2 / (shifted**2 + SIGMA_DATA**2), shifted * SIGMA_DATA * c_in, c_in
    raise usage(ValueError(f"unknown preconditioning {preconditioning!r}; choose one of {PRECONDITIONINGS}"))


class PreconditionedDenoiser:
    """D(x, sigma) -> x_0 (float64) for a network ``model(x, t, **model_kwargs)`` trained with
    ``preconditioning`` "edm" or "consistency" (module docstring); ``clip_denoised`` clamps x_0 to
    [-1, 1]. ``calls`` counts network evaluations."""

    def __init__(self, model, preconditioning, *, clip_denoised=True, model_kwargs=None):
        scalings(torch.ones(1, dtype=torch.float64), preconditioning)  # check the name early
        self.model = model
        self.preconditioning = preconditioning
        self.clip_denoised = clip_denoised
        self.model_kwargs = dict(model_kwargs or {})
        self.calls = 0

    def __call__(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0])
        c_skip, c_out, c_in = (c.reshape(-1, *[1] * (x.dim() - 1)) for c in scalings(sigma, self.preconditioning))
        x = x.to(torch.float64)
        dtype = solvers.model_dtype(self.model, x)
        output = self.model((c_in * x).to(dtype), (TIME_SCALE * torch.log(sigma)).to(dtype), **self.model_kwargs)
        self.calls += 1
        denoised = c_skip * x + c_out * output[:, : x.shape[1]].to(torch.float64)
        return denoised.clamp(-1, 1) if self.clip_denoised else denoised


def karras_sigmas(steps, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN):
    """``steps`` noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho)
    (Karras et al. 2022, eq. 5), float64."""
    ramp = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
    high, low = sigma_max ** (1 / RHO), sigma_min ** (1 / RHO)
    return (high + ramp * (low - high)) ** RHO


def parse_ts(text):
    """``--cm_ts`` "0,22,39" -> [0, 22, 39]: increasing points of a grid of last + 1 noise levels."""
    try:
        ts = [int(part) for part in text.split(",")]
    except ValueError:
        ts = []
    if len(ts) < 2 or ts[0] != 0 or any(b <= a for a, b in zip(ts, ts[1:])):
        raise usage(ValueError(
            f"--cm_ts {text!r}: give increasing integers starting at 0, e.g. --cm_ts 0,22,39 (the last one, "
            f"39, makes a grid of 40 noise levels from {SIGMA_MAX:g} to {SIGMA_MIN:g})"
        ))
    return ts


def onestep(denoiser, noise):
    """One evaluation at sigma_max: x_0 = D(sigma_max z, sigma_max) (Song et al. 2023, alg. 1, N = 1)."""
    with torch.no_grad():
        return denoiser(noise.to(torch.float64) * SIGMA_MAX, SIGMA_MAX).to(noise.dtype)


def multistep(denoiser, noise, ts, generator=None):
    """Multistep consistency sampling (Song et al. 2023, alg. 1) at grid points ``ts``.

    The grid has ts[-1] + 1 Karras levels from sigma_max to sigma_min; at each point t_i
    the model jumps to x_0, which is noised back to the next level with variance
    t_{i+1}^2 - sigma_min^2 (no noise after the last point, sigma_min).
    """
    grid = karras_sigmas(ts[-1] + 1)
    x = noise.to(torch.float64) * SIGMA_MAX
    with torch.no_grad():
        for here, there in zip(ts, ts[1:]):
            x0 = denoiser(x, float(grid[here]))
            level = float(np.clip(grid[there], SIGMA_MIN, SIGMA_MAX))
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)
            x = x0 + fresh * np.sqrt(level**2 - SIGMA_MIN**2)
    return x.to(noise.dtype)


def solve(denoiser, noise, solver, steps, *, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN, progress=False,
          generator=None, **options):
    """x_0 by ``solvers.SOLVERS[solver]`` in ``steps`` steps over ``denoiser`` on the Karras grid from
    ``sigma_max`` (default 80) to ``sigma_min`` (default 0.002), then 0: EDM's sampler with ``heun``."""
    step_fn = solvers.SOLVERS[solver]
    solvers.check_options(step_fn, options)
    if options.pop("dynamic_threshold", None) is not None:
        raise usage(ValueError("dynamic_threshold works with the ADM chain only; drop --dynamic_threshold"))
    levels = np.append(karras_sigmas(steps, sigma_max, sigma_min), 0.0)
    sigmas = torch.from_numpy(levels).to(noise.device)
    times = TIME_SCALE * torch.log(sigmas[:-1])

    def draw():
        return torch.randn(noise.shape, generator=generator, device=noise.device, dtype=torch.float64)

    y = noise.to(torch.float64) * sigmas[0]
    y = solvers.integrate(step_fn, lambda y, sigma: denoiser(y, sigma), y, sigmas, times, options, draw, progress)
    return y.to(noise.dtype)
