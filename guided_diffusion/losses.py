"""Likelihood terms used by the diffusion objective and by bits-per-dimension evaluation.

Both functions are elementwise: they return a tensor shaped like their (broadcast)
inputs, in nats. Callers average over non-batch dimensions and convert to bits.
"""

import math

import torch

# Half-width of one 8-bit bin when pixel values 0..255 are mapped onto [-1, 1].
_HALF_BIN = 1.0 / 255.0
# Inputs beyond these bounds are the outermost bins, whose mass extends to +-infinity.
_EDGE = 0.999
# Floor applied to probabilities before the logarithm, so a degenerate scale gives a
# large finite penalty instead of -inf.
_MIN_PROB = 1e-12


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Any argument may be a Python float as long as at least one is a tensor; floats
    are converted to that tensor's dtype and device, and all arguments broadcast.
    """
    reference = next(
        (a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)),
        None,
    )
    if reference is None:
        raise TypeError(
            "normal_kl needs at least one torch.Tensor argument to fix dtype and device; "
            f"got only {type(mean1).__name__}, {type(logvar1).__name__}, "
            f"{type(mean2).__name__}, {type(logvar2).__name__}. Wrap one value in torch.tensor()."
        )
    # torch.full writes the value on the device (torch.tensor would copy it from the
    # host, which makes the host wait for the GPU).
    logvar1, logvar2 = (
        v if isinstance(v, torch.Tensor) else torch.full((), v, dtype=reference.dtype, device=reference.device)
        for v in (logvar1, logvar2)
    )
    # 2 KL = log(s2^2/s1^2) + s1^2/s2^2 + (m1 - m2)^2 / s2^2 - 1
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """Standard normal CDF by the tanh approximation (Page, 1977), as used by ADM."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-probability of 8-bit data under a Gaussian discretised onto 256 bins.

    Ho et al. (2020), eq. 13: each value x in [-1, 1] owns the bin
    [x - 1/255, x + 1/255]; the two outermost bins extend to -inf / +inf.

    :param x: data rescaled to [-1, 1], any shape.
    :param means: Gaussian means, same shape as ``x``.
    :param log_scales: log standard deviations, same shape as ``x``.
    :return: elementwise log-likelihood in nats, same shape as ``x``.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            "discretized_gaussian_log_likelihood needs x, means and log_scales of one shape; "
            f"got {tuple(x.shape)}, {tuple(means.shape)}, {tuple(log_scales.shape)}. "
            "Broadcast them explicitly before the call."
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + _HALF_BIN))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - _HALF_BIN))
    log_cdf_upper = torch.log(cdf_upper.clamp(min=_MIN_PROB))
    log_survival_lower = torch.log((1.0 - cdf_lower).clamp(min=_MIN_PROB))
    log_bin_mass = torch.log((cdf_upper - cdf_lower).clamp(min=_MIN_PROB))
    return torch.where(
        x < -_EDGE,
        log_cdf_upper,
        torch.where(x > _EDGE, log_survival_lower, log_bin_mass),
    )
