"""Timestep samplers for training: which t each example is trained on, and its weight.

Sampling t with probability p_t and weighting its loss by 1 / (T p_t) keeps the
objective unbiased while spending more samples where the loss varies most
(Nichol & Dhariwal 2021, section 3.3, importance sampling of L_vlb).
"""

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist

from . import dist_util
from .errors import usage


def create_named_schedule_sampler(name, diffusion):
    """Build a sampler by name: ``"uniform"`` or ``"loss-second-moment"``."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise usage(NotImplementedError(
        f"unknown schedule sampler {name!r}; choose 'uniform' or 'loss-second-moment' "
        "(flag --schedule_sampler)."
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
