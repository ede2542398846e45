"""Small layers and maths helpers shared by the networks and the diffusion code.

Everything here keeps the names of the original `guided_diffusion.nn` module so
that downstream code importing them keeps working; the bodies are plain PyTorch.
"""

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint

from . import fastpaths
from .errors import usage

NORM_GROUPS = 32  # GroupNorm groups used everywhere in ADM


class SiLU(nn.SiLU):
    """x * sigmoid(x); kept as a named class because checkpoints' module trees use it."""

    def forward(self, x):
        return nn.functional.silu(x)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that normalises in float32 and hands back the input's dtype.

    Half-precision statistics over large groups lose too much accuracy, so the
    float16 torso of an fp16 model still normalises in float32.
    """

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


def _pick_by_dims(dims, choices, what):
    if dims not in choices:
        raise ValueError(
            f"{what} supports dims 1, 2 or 3 (1-D signals, images, volumes); got dims={dims!r}. "
            f"Pass dims=1, 2 or 3."
        )
    return choices[dims]


def conv_nd(dims, *args, **kwargs):
    """A 1-D, 2-D or 3-D convolution (`torch.nn.Conv{dims}d(*args, **kwargs)`)."""
    cls = _pick_by_dims(dims, {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}, "conv_nd")
    return cls(*args, **kwargs)


def linear(*args, **kwargs):
    """A fully connected layer (`torch.nn.Linear`)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1-D, 2-D or 3-D average pooling layer."""
    cls = _pick_by_dims(dims, {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}, "avg_pool_nd")
    return cls(*args, **kwargs)


@torch.no_grad()
def update_ema(target_params, source_params, rate=0.99):
    """Move each target tensor towards its source in place: targ = rate * targ + (1 - rate) * src.

    All pairs at once with multi-tensor (foreach) kernels, the same arithmetic as a
    per-tensor loop (fast path ``foreach``).
    """
    pairs = list(zip(target_params, source_params))  # zip's pairing, as in the original
    targets = [t.detach() for t, _ in pairs]
    sources = [s.detach() for _, s in pairs]
    if fastpaths.enabled("foreach") and targets:
        torch._foreach_mul_(targets, rate)
        torch._foreach_add_(targets, sources, alpha=1 - rate)
        return
    for targ, src in zip(targets, sources):
        targ.mul_(rate).add_(src, alpha=1 - rate)


@torch.no_grad()
def zero_module(module):
    """Set every parameter of `module` to zero in place and return the module."""
    for p in module.parameters():
        p.zero_()
    return module


@torch.no_grad()
def scale_module(module, scale):
    """Multiply every parameter of `module` by `scale` in place and return the module."""
    for p in module.parameters():
        p.mul_(scale)
    return module


def mean_flat(tensor):
    """Mean over every dimension but the first (batch); a 1-D tensor gives its overall mean."""
    if tensor.dim() <= 1:
        return tensor.mean()
    return tensor.mean(dim=tuple(range(1, tensor.dim())))


def normalization(channels):
    """The normalisation layer of ADM: GroupNorm32 with 32 groups over `channels` channels."""
    if channels % NORM_GROUPS != 0:
        raise usage(ValueError(
            f"normalization() uses GroupNorm with {NORM_GROUPS} groups, so the channel count must be "
            f"a multiple of {NORM_GROUPS}; got {channels}. Choose --num_channels (and --channel_mult) "
            f"so that every level's width is a multiple of {NORM_GROUPS}."
        ))
    return GroupNorm32(NORM_GROUPS, channels)


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps, as in "Attention Is All You Need".

    timesteps: [N] tensor (int or float). Returns [N, dim] float32: first the cosines,
    then the sines, of t * max_period^(-k / half) for k = 0..half-1 (half = dim // 2);
    an odd `dim` gets one trailing zero column.
    """
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * exponents / half)
    args = timesteps[:, None].float() * freqs[None]
    parts = [torch.cos(args), torch.sin(args)]
    if dim % 2:
        parts.append(torch.zeros_like(args[:, :1]))
    return torch.cat(parts, dim=-1)


def checkpoint(func, inputs, params, flag):
    """Evaluate `func(*inputs)`, trading compute for memory when `flag` is true.

    With `flag`, intermediate activations are dropped and recomputed in the
    backward pass (`torch.utils.checkpoint`, non-reentrant, RNG state restored so
    dropout masks repeat). Outputs and gradients are identical to the plain call,
    and gradients flow to the inputs even when no parameter requires grad.
    `params` is accepted for compatibility with the original signature; the
    non-reentrant implementation finds the parameters by itself.
    """
    del params
    if not flag:
        return func(*inputs)
    return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False, preserve_rng_state=True)
