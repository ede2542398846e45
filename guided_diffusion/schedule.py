"""A discrete chain's noise levels as float64 tables and as continuous functions of time.

A chain with cumulative alphas abar_t (t = 0..T-1) noises data as
x_t = alpha_t x_0 + sigma_t eps with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).
Three equivalent one-variable descriptions of step t are kept as float64 tables:

- ``logsnr[t]`` = log(alpha_t^2 / sigma_t^2), the signal-to-noise ratio in log space
  (Kingma et al. 2021, "Variational Diffusion Models"), decreasing in t;
- ``alpha[t]`` and ``sigma[t]``, the variance-preserving scales above;
- ``karras_sigma[t]`` = sigma_t / alpha_t = exp(-logsnr / 2), the noise level of the
  equivalent variance-exploding process x / alpha = x_0 + karras_sigma eps (Karras et
  al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Between table entries, fractional timesteps are interpolated linearly in
log(karras_sigma), which is linear in logSNR (k-diffusion's convention), so a model
trained on integer steps can be queried at any t in [0, T-1] and the maps hit the
tables exactly at integers.
"""

import numpy as np
import torch


class ScheduleView:
    """Float64 tables and continuous maps t <-> logSNR <-> sigma for one chain.

    :param alphas_cumprod: 1-D float64 array of abar_t, decreasing, in (0, 1].
    """

    def __init__(self, alphas_cumprod):
        abar = np.asarray(alphas_cumprod, dtype=np.float64)
        self.num_timesteps = int(abar.shape[0])
        self.alphas_cumprod = abar
        self.alpha = np.sqrt(abar)
        self.sigma = np.sqrt(1.0 - abar)
        with np.errstate(divide="ignore"):  # abar_T = 0 (zero terminal SNR): logSNR -inf, sigma inf
            self.logsnr = np.log(abar) - np.log1p(-abar)
            self.karras_sigma = np.sqrt((1.0 - abar) / abar)
        self.reaches_zero_snr = bool(abar[-1] == 0.0)
        self._torch = {}

    def _table(self, name, device):
        """Float64 torch copy of a table on ``device``, built once per (name, device)."""
        key = (name, torch.device(device))
        table = self._torch.get(key)
        if table is None:
            table = torch.from_numpy(np.ascontiguousarray(getattr(self, name))).to(key[1])
            self._torch[key] = table
        return table

    def logsnr_at(self, t):
        """logSNR at (fractional) timesteps ``t`` in [0, T-1]; float64 tensor shaped like t."""
        t = _as_float64(t)
        self._check_range(t)
        table = self._table("logsnr", t.device)
        low = t.floor().long()
        high = t.ceil().long()
        frac = t - low
        between = table[low] + frac * (table[high] - table[low])
        return torch.where(frac == 0, table[low], between)

    def karras_sigma_at(self, t):
        """sigma_t / alpha_t at (fractional) timesteps ``t``; float64 tensor."""
        return torch.exp(-0.5 * self.logsnr_at(t))

    def alpha_sigma_at(self, t):
        """(alpha_t, sigma_t) of the variance-preserving process at (fractional) timesteps ``t``."""
        logsnr = self.logsnr_at(t)
        return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()

    def t_at_logsnr(self, logsnr):
        """The fractional timestep whose interpolated logSNR is ``logsnr`` (clamped to the chain's range)."""
        logsnr = _as_float64(logsnr)
        table = self._table("logsnr", logsnr.device)
        if self.num_timesteps == 1:
            return torch.zeros_like(logsnr)
        # The table decreases with t; search the negated (increasing) table.
        rising = -table
        high = torch.searchsorted(rising, -logsnr.contiguous()).clamp(1, self.num_timesteps - 1)
        low = high - 1
        gap = rising[high] - rising[low]
        frac = torch.where(gap > 0, (-logsnr - rising[low]) / torch.where(gap > 0, gap, 1.0), 0.0)
        return low.to(torch.float64) + frac.clamp(0.0, 1.0)

    def t_at_karras_sigma(self, sigma):
        """The fractional timestep of noise level ``sigma`` (= sigma_t / alpha_t)."""
        return self.t_at_logsnr(-2.0 * torch.log(_as_float64(sigma)))

    def _check_range(self, t):
        if t.numel() and (t.min() < 0 or t.max() > self.num_timesteps - 1):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps - 1}] for this {self.num_timesteps}-step "
                f"chain; got values in [{float(t.min())}, {float(t.max())}]."
            )


def _as_float64(values):
    if isinstance(values, torch.Tensor):
        return values.to(torch.float64)
    return torch.as_tensor(np.asarray(values, dtype=np.float64))
