"""Timestep samplers for training: which t each example is trained on, and its weight.

Sampling t with probability p_t and weighting its loss by 1 / (T p_t) keeps the
objective unbiased while spending more samples where the loss varies most
(Nichol & Dhariwal 2021, section 3.3, importance sampling of L_vlb).

Besides the original's ``uniform`` and ``loss-second-moment``, two fixed densities over
log SNR: ``lognormal`` (EDM's training noise levels, ln sigma ~ N(-1.2, 1.2^2), Karras et
al. 2022, table 1) and ``logit-normal`` (log SNR ~ N(0, 2^2): abar_t is logit-normal, as
SD3's timesteps are for rectified flow, Esser et al. 2024, section 3.1).
"""

import math

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist

from . import dist_util
from .errors import usage


EDM_P_MEAN, EDM_P_STD = -1.2, 1.2  # Karras et al. 2022, table 1: ln sigma ~ N(P_mean, P_std^2)
LOGIT_NORMAL_MEAN, LOGIT_NORMAL_STD = 0.0, 2.0  # log SNR = -2 logit(t) of SD3's logit-normal(0, 1)


def create_named_schedule_sampler(name, diffusion):
    """Build a sampler by name: ``"uniform"``, ``"loss-second-moment"``, ``"lognormal"`` or ``"logit-normal"``."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    if name == "lognormal":
        # ln sigma = -logsnr / 2, so logsnr ~ N(-2 P_mean, (2 P_std)^2).
        return LogSNRNormalSampler(diffusion, -2.0 * EDM_P_MEAN, 2.0 * EDM_P_STD)
    if name == "logit-normal":
        return LogSNRNormalSampler(diffusion, LOGIT_NORMAL_MEAN, LOGIT_NORMAL_STD)
    raise usage(NotImplementedError(
        f"unknown schedule sampler {name!r}; choose 'uniform', 'loss-second-moment', 'lognormal' or "
        "'logit-normal' (flag --schedule_sampler)."
    ))


class ScheduleSampler(ABC):
    """A distribution over timesteps, used to reduce the variance of the objective."""

    @abstractmethod
    def weights(self):
        """Unnormalised, positive float64 numpy weights, one per timestep."""

    def sample(self, batch_size, device):
        """Draw timesteps with ``numpy.random.choice`` (the global numpy generator).

        :return: ``(indices, weights)``: int64 timesteps [batch_size] and float32
            importance weights 1 / (T p_t), both on ``device``.
        """
        w = self.weights()
        p = w / np.sum(w)
        indices = np.random.choice(len(p), size=(batch_size,), p=p)
        importance = 1 / (len(p) * p[indices])
        # non_blocking: the host arrays are staged at once, without waiting for the GPU.
        return (
            th.from_numpy(indices).long().to(device, non_blocking=True),
            th.from_numpy(importance).float().to(device, non_blocking=True),
        )


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely (all weights 1)."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LogSNRNormalSampler(ScheduleSampler):
    """Timesteps whose log SNR is normally distributed, N(mean, std^2), each mapped to the nearest step.

    p_t is the normal's mass between the midpoints of step t's log SNR and its neighbours'
    (the end steps take the tails), mixed with ``uniform_prob`` of uniform so that every
    step keeps a positive probability (the SNR-0 step of a zero-terminal chain, whose
    interval is empty, included). ``sample`` returns the importance weights 1 / (T p_t):
    with them the expected weighted loss is exactly the uniform objective (1/T) sum_t L_t,
    so the density moves samples between noise levels without changing what is
    minimised. With ``importance=False`` the weights are 1 and the density becomes part
    of the objective, sum_t p_t L_t (EDM's and SD3's use).
    """

    def __init__(self, diffusion, mean, std, uniform_prob=1e-3, importance=True):
        self.diffusion = diffusion
        self.mean = mean                    # of the log SNR
        self.std = std
        self.uniform_prob = uniform_prob    # share of uniform mass: every step stays reachable
        self.importance = importance        # 1 / (T p_t) weights (unbiased) or ones
        logsnr = diffusion.schedule.logsnr  # decreasing in t
        edges = np.concatenate([[np.inf], (logsnr[1:] + logsnr[:-1]) / 2, [-np.inf]])
        mass = _normal_cdf((edges[:-1] - mean) / std) - _normal_cdf((edges[1:] - mean) / std)
        self._weights = (1 - uniform_prob) * mass / mass.sum() + uniform_prob / len(mass)

    def weights(self):
        return self._weights

    def sample(self, batch_size, device):
        indices, weights = super().sample(batch_size, device)
        return indices, weights if self.importance else th.ones_like(weights)


def _normal_cdf(z):
    """Standard normal CDF of a float64 array (infinities allowed)."""
    return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


class LossAwareSampler(ScheduleSampler):
    """A sampler that adapts to the losses observed during training."""

    def update_with_local_losses(self, local_ts, local_losses):
        """Record this process's per-example losses, gathered from every rank first.

        Every rank must call this with its own batch, so that all samplers stay
        identical. Works as a single plain process when torch.distributed is not
        initialised.

        :param local_ts: int tensor [B] of timesteps.
        :param local_losses: float tensor [B] of the corresponding losses.
        """
        if dist_util.get_world_size() > 1:
            timesteps, losses = _gather_variable_length(local_ts, local_losses)
        else:
            timesteps, losses = local_ts.tolist(), local_losses.tolist()
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Record losses (lists of python numbers) gathered from all ranks."""


def _gather_variable_length(local_ts, local_losses):
    """All-gather two [B_rank] tensors whose length may differ per rank; returns flat lists."""
    world = dist_util.get_world_size()
    device = local_ts.device
    size = th.tensor([len(local_ts)], dtype=th.int32, device=device)
    sizes = [th.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)

    def gather(local):
        padded = th.zeros(longest, dtype=local.dtype, device=local.device)
        padded[: len(local)] = local
        chunks = [th.zeros_like(padded) for _ in range(world)]
        dist.all_gather(chunks, padded)
        return [v for chunk, n in zip(chunks, sizes) for v in chunk[:n].tolist()]

    return gather(local_ts), gather(local_losses)


class LossSecondMomentResampler(LossAwareSampler):
    """Sample t proportionally to sqrt(E[L_t^2]) over the last ``history_per_term`` losses.

    Uniform until every timestep has a full history; afterwards a fraction
    ``uniform_prob`` of the probability mass stays uniform.
    """

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Full: drop the oldest loss.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return bool((self._loss_counts == self.history_per_term).all())
