"""Guidance: ways to steer sampling towards a condition, kept out of the sampler code.

A guide is built here and handed to the sampling loops as the original's
``cond_fn`` (added to the mean, or to the predicted noise for DDIM and PLMS).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def classifier_cond_fn(classifier: torch.nn.Module, scale: float) -> Callable:
    """``cond_fn(x, t, y) = scale * d/dx log p(y | x_t)`` for classifier guidance.

    Dhariwal & Nichol 2021, Algorithms 1-2: the gradient of the classifier's
    log-softmax at the wanted labels, taken with respect to the noisy image x_t
    (shape NCHW, same as the returned gradient).
    """

    def cond_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor = None) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier guidance needs labels: pass model_kwargs={'y': labels}")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            chosen = log_probs[torch.arange(len(y), device=log_probs.device), y.view(-1)]
            return torch.autograd.grad(chosen.sum(), x_in)[0] * scale

    return cond_fn
