"""Guidance: ways to steer sampling towards a condition, kept out of the sampler code.

Two kinds, which combine:

- classifier guidance (``classifier_cond_fn``) is handed to the sampling loops as the
  original's ``cond_fn`` (added to the mean, or to the predicted noise for DDIM, PLMS
  and the solvers);
- classifier-free guidance (``classifier_free``) wraps the model itself: the wrapper has
  the UNet's call signature, so every sampler, solver and ``SpacedDiffusion`` takes it
  where they take the model.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

NULL_LABEL = -1  # a row with this label is unconditional (UNetModel skips its class embedding)


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


def classifier_free(model: Callable, scale: float, *, uncond_model: Optional[Callable] = None,
                    interval: Optional[tuple] = None, timestep_scale: float = 1.0) -> Callable:
    """The model with classifier-free guidance: eps = eps_c + scale * (eps_c - eps_u).

    Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6 written with the
    original's convention for scales: 0 is plain conditional sampling (as
    ``--classifier_scale 0``); the "(1 + w)" convention of other libraries is
    scale = w - 1. Only the noise channels are guided; learned-variance channels
    come from the conditional branch.

    :param model: the conditional model, called ``model(x, t, **model_kwargs)``.
    :param scale: the guidance scale.
    :param uncond_model: the guide, when it is another network: an unconditional
        model (e.g. ``256x256_diffusion_uncond`` guiding ``256x256_diffusion``; it gets no
        ``y``) or a weaker or earlier checkpoint of the same model, which gets the same
        labels (autoguidance, Karras et al. 2024). Default: ``model`` itself with every
        label set to ``NULL_LABEL``, evaluated in the same call as a doubled batch.
    :param interval: ``(t_lo, t_hi)`` in the model chain's timesteps: guide only where
        t_lo <= t <= t_hi (Kynkaanniemi et al. 2024, "Applying guidance in a limited
        interval improves sample and distribution quality"); elsewhere the guide is not
        evaluated at all.
    :param timestep_scale: model timesteps per chain step (1000 / T for a diffusion that
        rescales timesteps), to compare the timesteps the wrapper receives with ``interval``.
    """
    return ClassifierFreeGuidance(model, scale, uncond_model, interval, timestep_scale)


class ClassifierFreeGuidance:
    """What ``classifier_free`` returns; see there."""

    def __init__(self, model, scale, uncond_model, interval, timestep_scale):
        if interval is not None:
            low, high = interval
            if not low <= high:
                raise ValueError(f"the guidance interval must be (low, high) with low <= high; got {interval!r}.")
        self.model = model
        self.scale = float(scale)
        self.uncond_model = uncond_model
        self.interval = interval
        self.timestep_scale = timestep_scale
        self.num_classes = getattr(model, "num_classes", None)

    def parameters(self):
        """The conditional model's parameters (the samplers read the device from them)."""
        return self.model.parameters()

    def __call__(self, x, timesteps, y=None, **model_kwargs):
        if y is not None:
            model_kwargs["y"] = y
        if self.scale == 0:
            return self.model(x, timesteps, **model_kwargs)
        guided = self._guided_rows(timesteps, x.shape[0])
        rows = guided.nonzero().flatten() if guided is not None else None
        if rows is not None and rows.numel() == 0:
            return self.model(x, timesteps, **model_kwargs)
        output, unguided = self._branches(x, timesteps, model_kwargs, rows)
        channels = x.shape[1]
        eps = output[:, :channels] if rows is None else output[rows, :channels]
        eps = eps + self.scale * (eps - unguided[:, :channels])
        output = output.clone()
        if rows is None:
            output[:, :channels] = eps
        else:
            output[rows, :channels] = eps
        return output

    def _guided_rows(self, timesteps, batch):
        """Boolean [B] of the rows inside the interval (None: every row)."""
        if self.interval is None:
            return None
        t = torch.as_tensor(timesteps).float().expand(batch) / self.timestep_scale
        low, high = self.interval
        inside = (t >= low) & (t <= high)
        return None if bool(inside.all()) else inside

    def _branches(self, x, timesteps, model_kwargs, rows):
        """(conditional output for every row, guide output for ``rows`` (None: all))."""
        t = torch.as_tensor(timesteps, device=x.device).expand(x.shape[0])
        pick = (lambda v: v) if rows is None else (lambda v: v[rows])
        if self.uncond_model is None:
            labels = model_kwargs.get("y")
            if labels is None:
                raise ValueError(
                    "classifier-free guidance with the model as its own guide needs class labels (y); "
                    "give an unconditional uncond_model (--guide_model_path) for other models."
                )
            kwargs = {k: torch.cat([v, pick(v)]) if _is_rows(v, x) else v for k, v in model_kwargs.items()}
            kwargs["y"] = torch.cat([labels, torch.full_like(pick(labels), NULL_LABEL)])
            both = self.model(torch.cat([x, pick(x)]), torch.cat([t, pick(t)]), **kwargs)
            return both[: x.shape[0]], both[x.shape[0]:]
        kwargs = {k: pick(v) for k, v in model_kwargs.items() if _is_rows(v, x)}
        kwargs.update({k: v for k, v in model_kwargs.items() if not _is_rows(v, x)})
        if getattr(self.uncond_model, "num_classes", None) is None:
            kwargs.pop("y", None)
        return self.model(x, timesteps, **model_kwargs), self.uncond_model(pick(x), pick(t), **kwargs)


def _is_rows(value, x):
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == x.shape[0]

