"""Timestep respacing: run a diffusion trained on T steps with a subset of them.

Keeping steps S = {s_1 < ... < s_K} of a T-step chain defines a K-step chain with
the same marginals: its cumulative alphas are alpha_bar[s_k], so its betas are
1 - alpha_bar[s_k] / alpha_bar[s_{k-1}] (Nichol & Dhariwal 2021, section 4). The
model keeps seeing the original chain's timesteps.
"""

import numpy as np
import torch as th

from .errors import usage
from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """Choose which steps of a ``num_timesteps``-step chain to keep; returns a set of ints.

    :param section_counts: how many steps to keep, either
        - a list of ints or a comma string (``"10,15,20"``): the chain is cut into that
          many equal sections (earlier sections one step longer when it does not divide),
          and each section keeps that many evenly spaced steps, rounded to the nearest
          integer (Python's round-half-to-even), first and last step of the section included;
        - ``"ddimN"``: every k-th step from 0 for the smallest integer stride k that gives
          exactly N steps (DDIM's striding; e.g. "ddim25" of 1000 keeps 0, 40, ..., 960).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            return _ddim_stride_steps(num_timesteps, section_counts)
        try:
            section_counts = [int(part) for part in section_counts.split(",")]
        except ValueError:
            raise usage(ValueError(
                f"cannot parse timestep_respacing {section_counts!r}: use a step count like "
                "'250', comma-separated counts per section like '10,15,20', or 'ddimN' like 'ddim50'."
            )) from None
    section_counts = list(section_counts)
    if not section_counts:
        raise usage(ValueError("timestep_respacing needs at least one section count; got an empty list."))

    base_size, extra = divmod(num_timesteps, len(section_counts))
    kept = []
    start = 0
    for i, count in enumerate(section_counts):
        size = base_size + (1 if i < extra else 0)
        if count < 0 or count > size:
            raise usage(ValueError(
                f"cannot take {count} steps from section {i} of {size} steps (a {num_timesteps}-step "
                f"chain cut into {len(section_counts)} sections): each count must be between 0 and "
                f"its section size, here at most {size}."
            ))
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    if not kept:
        raise usage(ValueError(f"timestep_respacing {section_counts!r} keeps no steps; ask for at least one."))
    return set(kept)


def _ddim_stride_steps(num_timesteps, spec):
    try:
        desired = int(spec[len("ddim"):])
    except ValueError:
        raise usage(ValueError(
            f"cannot parse timestep_respacing {spec!r} (flag --timestep_respacing): 'ddim' must be "
            "followed by a step count, e.g. 'ddim50'."
        )) from None
    for stride in range(1, num_timesteps + 1):
        steps = range(0, num_timesteps, stride)
        if len(steps) == desired:
            return set(steps)
    possible = sorted({len(range(0, num_timesteps, k)) for k in range(1, num_timesteps + 1)})
    raise usage(ValueError(
        f"cannot keep exactly {desired} of {num_timesteps} steps with an integer stride ({spec!r}). "
        f"Possible ddim counts: {_summarise(possible)}; or give a plain count like '{desired}' "
        "for evenly rounded spacing."
    ))


def _summarise(values, limit=40):
    if len(values) <= limit:
        return ", ".join(map(str, values))
    head = ", ".join(map(str, values[: limit // 2]))
    tail = ", ".join(map(str, values[-limit // 2 :]))
    return f"{head}, ..., {tail}"


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that skips steps of a base diffusion.

    :param use_timesteps: steps of the base chain to keep (any iterable of ints;
        duplicates and order do not matter).
    :param kwargs: the base diffusion's ``GaussianDiffusion`` arguments (its ``betas``
        define the original chain).

    ``timestep_map[k]`` is the original step of respaced step k (increasing). Models and
    guidance functions are wrapped so they see original-chain steps, rescaled to
    0..1000 when ``rescale_timesteps``.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base = GaussianDiffusion(**kwargs)
        unknown = sorted(s for s in self.use_timesteps if not 0 <= s < self.original_num_steps)
        if unknown:
            raise ValueError(
                f"use_timesteps {unknown[:10]} lie outside the base chain's steps "
                f"0..{self.original_num_steps - 1}."
            )
        self.timestep_map = sorted(self.use_timesteps)
        kept_alphas_cumprod = base.alphas_cumprod[self.timestep_map]
        previous = np.append(1.0, kept_alphas_cumprod[:-1])
        kwargs["betas"] = 1 - kept_alphas_cumprod / previous
        super().__init__(**kwargs)
        self.model_schedule = base.schedule
        self._map_tensors = {}

    def _timestep_map_on(self, device):
        mapping = self._map_tensors.get(device)
        if mapping is None:
            mapping = th.tensor(self.timestep_map, dtype=th.long, device=device)
            self._map_tensors[device] = mapping
        return mapping

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.rescale_timesteps, self.original_num_steps, self)

    def _scale_timesteps(self, t):
        # The wrapper maps (and rescales) timesteps; nothing to do here.
        return t

    def _model_timesteps(self, t):
        return _map_timesteps(self._timestep_map_on(t.device), t, self.rescale_timesteps, self.original_num_steps)


class _WrappedModel:
    """Calls ``model`` (or a guidance function) with original-chain timesteps."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps, diffusion=None):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps
        self._diffusion = diffusion

    def __call__(self, x, ts, **kwargs):
        if self._diffusion is not None:
            mapping = self._diffusion._timestep_map_on(ts.device)
        else:
            mapping = th.tensor(self.timestep_map, dtype=th.long, device=ts.device)
        return self.model(x, _map_timesteps(mapping, ts, self.rescale_timesteps, self.original_num_steps), **kwargs)


def _map_timesteps(mapping, ts, rescale_timesteps, original_num_steps):
    """Respaced steps ``ts`` as the base chain's steps (floats in 0..1000 when ``rescale_timesteps``)."""
    new_ts = mapping[ts].to(ts.dtype)
    if rescale_timesteps:
        new_ts = new_ts.float() * (1000.0 / original_num_steps)
    return new_ts
