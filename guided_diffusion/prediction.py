"""What the network predicts: one small object per parameterisation of the reverse process.

The mean channels of an ADM network predict one of four quantities (its
``ModelMeanType``): the noise eps, the clean image x_0, the posterior mean x_{t-1}, or
the velocity v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022).
Every consumer (``p_mean_variance``, the training loss, DDIM/PLMS, guidance, the
likelihood) converts through this module, so a new target is one enum member plus one
class here, never another branch in the loops.

The conversions are functions of the forward process x_t = sqrt(abar_t) x_0 +
sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4) and its posterior mean
mu_t = c1_t x_0 + c2_t x_t (eq. 7). They read the float64 tables of a diffusion through
``diffusion._coef(name, t, x)``: table ``name`` gathered at the int64 timesteps t [B],
cast to x's compute dtype and expanded to x's shape [B, C, ...]. Operation order is that
of the original implementation, so results match it bit for bit.
"""

import torch


def x0_from_eps(diffusion, x_t, t, eps):
    """x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps: Ho et al. (2020) eq. 4 solved for x_0."""
    check_same_shape(eps, x_t, "eps", "x_t")
    return (
        diffusion._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
        - diffusion._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
    )


def eps_from_x0(diffusion, x_t, t, x0):
    """eps = (sqrt(1/abar_t) x_t - x_0) / sqrt(1/abar_t - 1): the same equation solved for eps.

    On a chain that ends at SNR 0 (abar_T = 0, where 1/sqrt(abar_T) is infinite) the
    equivalent eps = (x_t - alpha_t x_0) / sigma_t, finite at every step.
    """
    if diffusion.schedule.reaches_zero_snr:
        return (x_t - diffusion._coef("alpha", t, x_t) * x0) / diffusion._coef("sigma", t, x_t)
    return (
        diffusion._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0
    ) / diffusion._coef("sqrt_recipm1_alphas_cumprod", t, x_t)


def x0_from_xprev(diffusion, x_t, t, xprev):
    """x_0 = mu / c1_t - (c2_t / c1_t) x_t: the posterior mean (Ho et al. eq. 7) solved for x_0."""
    check_same_shape(xprev, x_t, "xprev", "x_t")
    return (
        diffusion._coef("xprev_coef_xprev", t, x_t) * xprev
        - diffusion._coef("xprev_coef_xt", t, x_t) * x_t
    )


def posterior_mean(diffusion, x0, x_t, t):
    """mu_t(x_t, x_0), the mean of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 7), via the diffusion."""
    return diffusion.q_posterior_mean_variance(x0, x_t, t)[0]


class Parameterisation:
    """How one kind of network output relates to (x_0, eps, mean) and what it is trained on.

    ``output`` below is the network's mean channels [B, C, ...], ``x_t`` the noisy
    input of the same shape, ``t`` int64 timesteps [B].
    """

    mean_type = None  # the name of the ModelMeanType member this implements
    continuous = True  # defined at any noise level, not only at the chain's steps (see from_scales)

    def to_x0(self, diffusion, output, x_t, t):
        """The x_0 the output implies (before any clipping)."""
        raise NotImplementedError

    def to_eps(self, diffusion, output, x_t, t):
        """The eps the output implies."""
        return eps_from_x0(diffusion, x_t, t, self.to_x0(diffusion, output, x_t, t))

    def to_x0_eps(self, diffusion, output, x_t, t):
        """Both (x_0, eps) the output implies."""
        return self.to_x0(diffusion, output, x_t, t), self.to_eps(diffusion, output, x_t, t)

    def mean(self, diffusion, output, x0, x_t, t):
        """The reverse-process mean, given the (possibly clipped) x_0 prediction ``x0``."""
        return posterior_mean(diffusion, x0, x_t, t)

    def target(self, diffusion, x_start, x_t, t, noise):
        """What the output is regressed onto by the MSE loss, given x_0, x_t and the noise drawn."""
        raise NotImplementedError

    def from_scales(self, output, x_t, alpha, sigma):
        """(x_0, eps) from the output at any noise level of x_t = alpha x_0 + sigma eps
        (alpha, sigma broadcastable to x_t): the continuous-time form the solvers use."""
        raise NotImplementedError

    def x0_mse_scale(self, snr):
        """How the squared error of this target compares to that of x_0 at the same x_t, as a
        function of the signal-to-noise ratio ``snr`` = abar_t / (1 - abar_t) (loss_weights.py)."""
        raise NotImplementedError(
            f"loss weights are defined for models that predict eps, x_0 or v, not {self.mean_type}."
        )


class Epsilon(Parameterisation):
    """The output is the noise eps (Ho et al. 2020, eq. 11-14)."""

    mean_type = "EPSILON"

    def to_x0(self, diffusion, output, x_t, t):
        return x0_from_eps(diffusion, x_t, t, output)

    def to_eps(self, diffusion, output, x_t, t):
        return output

    def target(self, diffusion, x_start, x_t, t, noise):
        return noise

    def from_scales(self, output, x_t, alpha, sigma):
        return (x_t - sigma * output) / alpha, output

    def x0_mse_scale(self, snr):
        return snr  # x_0 - x0_hat = -(sigma / alpha)(eps - eps_hat)


class StartX(Parameterisation):
    """The output is the clean image x_0 (Ho et al. 2020, section 3.2)."""

    mean_type = "START_X"

    def to_x0(self, diffusion, output, x_t, t):
        return output

    def target(self, diffusion, x_start, x_t, t, noise):
        return x_start

    def from_scales(self, output, x_t, alpha, sigma):
        return output, (x_t - alpha * output) / sigma

    def x0_mse_scale(self, snr):
        return torch.ones_like(snr)


class PreviousX(Parameterisation):
    """The output is the posterior mean x_{t-1} itself (Ho et al. 2020, eq. 7 and 8).

    The reverse mean is the output as predicted, not recomputed from a clipped x_0.
    """

    mean_type = "PREVIOUS_X"
    continuous = False  # x_{t-1} is tied to the chain's step size

    def to_x0(self, diffusion, output, x_t, t):
        return x0_from_xprev(diffusion, x_t, t, output)

    def mean(self, diffusion, output, x0, x_t, t):
        return output

    def target(self, diffusion, x_start, x_t, t, noise):
        return posterior_mean(diffusion, x_start, x_t, t)

    def from_scales(self, output, x_t, alpha, sigma):
        raise NotImplementedError(
            "a model that predicts x_{t-1} (PREVIOUS_X) has no prediction between the chain's steps; "
            "sample it with the original's loops (p_sample_loop, ddim_sample_loop)."
        )


class Velocity(Parameterisation):
    """The output is the velocity v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, "Progressive
    Distillation", appendix D), with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).

    Since alpha_t^2 + sigma_t^2 = 1, x_0 = alpha_t x_t - sigma_t v and eps = sigma_t x_t + alpha_t v:
    both finite at every step, also at SNR 0 (zero-terminal-SNR schedules, Lin et al. 2023).
    """

    mean_type = "VELOCITY"

    def to_x0(self, diffusion, output, x_t, t):
        check_same_shape(output, x_t, "v", "x_t")
        return diffusion._coef("alpha", t, x_t) * x_t - diffusion._coef("sigma", t, x_t) * output

    def to_eps(self, diffusion, output, x_t, t):
        return diffusion._coef("sigma", t, x_t) * x_t + diffusion._coef("alpha", t, x_t) * output

    def target(self, diffusion, x_start, x_t, t, noise):
        return diffusion._coef("alpha", t, x_t) * noise - diffusion._coef("sigma", t, x_t) * x_start

    def from_scales(self, output, x_t, alpha, sigma):
        # Variance-preserving scales (alpha^2 + sigma^2 = 1), as the solvers pass them.
        return alpha * x_t - sigma * output, sigma * x_t + alpha * output

    def x0_mse_scale(self, snr):
        return snr + 1.0  # x_0 - x0_hat = -sigma (v - v_hat) and 1 / sigma^2 = snr + 1


PARAMETERISATIONS = {cls.mean_type: cls() for cls in (PreviousX, StartX, Epsilon, Velocity)}


def for_mean_type(mean_type):
    """The parameterisation object of a ``ModelMeanType`` member (or its name)."""
    name = getattr(mean_type, "name", mean_type)
    found = PARAMETERISATIONS.get(name)
    if found is None:
        raise NotImplementedError(
            f"unknown model_mean_type {mean_type!r}; known: {', '.join(PARAMETERISATIONS)}."
        )
    return found


def check_same_shape(a, b, name_a, name_b):
    if a.shape != b.shape:
        raise ValueError(f"{name_a} shape {tuple(a.shape)} must equal {name_b} shape {tuple(b.shape)}.")
