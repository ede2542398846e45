"""Loss weights: how much each noise level counts in the MSE term, as functions of log SNR.

A weighting is a small object that maps the log signal-to-noise ratio lambda_t =
log(abar_t / (1 - abar_t)) (float64, from the diffusion's ``logsnr`` table) to a
per-example weight on the MSE of whatever the network predicts. Each weighting is
defined once, as the weight w_x0(snr) it puts on the error of x_0; the weight on the
model's own target follows from how that target's error scales against x_0's at a
fixed x_t (``Parameterisation.x0_mse_scale``):

=========  ===========================  ====================
target     MSE relative to x_0's MSE    weight on its MSE
=========  ===========================  ====================
eps        snr                          w_x0 / snr
x_0        1                            w_x0
v          snr + 1                      w_x0 / (snr + 1)
=========  ===========================  ====================

so a weighting means the same objective whatever the target ("target-aware
normalisation"). Closed forms, with snr = exp(lambda) and sigma = exp(-lambda / 2):

- ``min_snr``: w_x0 = min(snr, gamma) (Hang et al. 2023, "Efficient Diffusion Training
  via Min-SNR Weighting Strategy", eq. 8): min(snr, gamma) / snr on eps,
  min(snr, gamma) / (snr + 1) on v.
- ``p2``: w_eps = 1 / (k + snr)^gamma (Choi et al. 2022, "Perception Prioritized
  Training of Diffusion Models", eq. 8, on the simple eps loss).
- ``edm``: w_x0 = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022,
  table 1, lambda(sigma)), that is lambda(sigma) sigma^2 on eps.
- ``snr_plus_one``: w_x0 = snr + 1 (Salimans & Ho 2022, "truncated SNR" / "SNR+1"
  weighting): the unweighted v loss, (snr + 1) / snr on eps.

Every form is written so that it stays finite at snr = 0 (a zero-terminal-SNR chain's
last step) for the x_0 and v targets, and for eps where its limit is finite (min_snr:
1, p2: 1 / k^gamma; edm and snr_plus_one put an infinite weight on eps there).
"""

import torch

from .errors import usage

LOSS_WEIGHTS = ("none", "min_snr", "p2", "edm", "snr_plus_one")


class LossWeight:
    """A weighting of the MSE term; ``weight(logsnr, parameterisation)`` is what training multiplies by."""

    def x0_weight(self, snr):
        """The weight on the MSE of x_0 at signal-to-noise ratio ``snr`` (float64 tensor)."""
        raise NotImplementedError

    def eps_weight(self, snr):
        """The weight on the MSE of eps, w_x0 / snr; a weighting whose limit at snr = 0 is finite
        writes it in a form that stays finite there (0/0 otherwise)."""
        return self.x0_weight(snr) / snr

    def weight(self, logsnr, parameterisation):
        """The weight on the MSE of ``parameterisation``'s target at ``logsnr`` (float64 tensor [B])."""
        snr = torch.exp(logsnr)
        if parameterisation.mean_type == "EPSILON":
            return self.eps_weight(snr)
        return self.x0_weight(snr) / parameterisation.x0_mse_scale(snr)

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class MinSNR(LossWeight):
    """min(snr, gamma) on x_0 (Hang et al. 2023, eq. 8)."""

    def __init__(self, gamma=5.0):
        self.gamma = gamma          # the SNR above which steps stop gaining weight

    def x0_weight(self, snr):
        return snr.clamp(max=self.gamma)

    def eps_weight(self, snr):
        return (self.gamma / snr).clamp(max=1.0)  # min(snr, gamma) / snr as min(1, gamma / snr)


class P2(LossWeight):
    """1 / (k + snr)^gamma on eps (Choi et al. 2022, eq. 8)."""

    def __init__(self, k=1.0, gamma=1.0):
        self.k = k                  # keeps the weight finite as snr -> 0
        self.gamma = gamma          # how strongly the high-SNR (fine detail) steps are down-weighted

    def x0_weight(self, snr):
        return snr / (self.k + snr) ** self.gamma

    def eps_weight(self, snr):
        return 1.0 / (self.k + snr) ** self.gamma


class EDM(LossWeight):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on x_0 (Karras et al. 2022, table 1)."""

    def __init__(self, sigma_data=0.5):
        self.sigma_data = sigma_data  # standard deviation of the data

    def x0_weight(self, snr):
        # (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / sigma_data^2 + 1 / sigma^2, with 1 / sigma^2 = snr.
        return 1.0 / self.sigma_data**2 + snr


class SNRPlusOne(LossWeight):
    """snr + 1 on x_0, the unweighted v loss (Salimans & Ho 2022, section 4)."""

    def x0_weight(self, snr):
        return snr + 1.0


def create_loss_weight(name, *, min_snr_gamma=5.0, p2_k=1.0, p2_gamma=1.0, sigma_data=0.5):
    """The weighting named ``name`` (one of ``LOSS_WEIGHTS``) with its parameters; None for ``"none"``."""
    if name in ("none", "", None):
        return None
    if name == "min_snr":
        return MinSNR(min_snr_gamma)
    if name == "p2":
        return P2(p2_k, p2_gamma)
    if name == "edm":
        return EDM(sigma_data)
    if name == "snr_plus_one":
        return SNRPlusOne()
    raise usage(ValueError(
        f"unknown loss weight {name!r}; choose one of {', '.join(LOSS_WEIGHTS)} (flag --loss_weight)."
    ))
