"""Small layers and maths helpers shared by the networks and the diffusion code.

Everything here keeps the names of the original `guided_diffusion.nn` module so
that downstream code importing them keeps working; the bodies are plain PyTorch.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import fastpaths
from .errors import usage

NORM_GROUPS = 32  # GroupNorm groups used everywhere in ADM


class SiLU(nn.SiLU):
    """x * sigmoid(x); kept as a named class because checkpoints' module trees use it.

    `follows(producer)` declares that this activation is applied directly to the
    fresh output of ``producer`` (a normalisation layer). Then, where no gradient is
    recorded (sampling), it overwrites that output in place, saving one tensor per
    call, unless a forward hook on ``producer`` has seen it or the ``inplace`` fast
    path is off. The numbers are the same either way.
    """

    def follows(self, producer):
        self.__dict__["_producer"] = producer  # a plain attribute: no submodule, no state_dict entry
        return self

    def forward(self, x):
        producer = self.__dict__.get("_producer")
        if (
            producer is not None
            and not torch.is_grad_enabled()
            and fastpaths.enabled("inplace")
            and not producer._forward_hooks
            and not nn.modules.module._global_forward_hooks
        ):
            return nn.functional.silu(x, inplace=True)
        return nn.functional.silu(x)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that normalises in float32 and hands back the input's dtype.

    Half-precision statistics over large groups lose too much accuracy, so the
    float16 torso of an fp16 model still normalises in float32.
    """

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class _GroupNormSiLU(torch.autograd.Function):
    """silu(group_norm(x)), or silu(group_norm(x) * (1 + scale) + shift), optionally followed by
    a convolution, storing only the inputs for the backward pass.

    The backward pass re-runs the normalisation and activation from x (the same
    kernels, so the same bits) and applies the same backward kernels autograd would,
    so outputs and gradients equal those of the plain composition; the normalised,
    modulated and activated tensors are never kept alive between the passes.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, scale, shift, conv_weight, conv_bias, conv_args):
        y, mean, rstd, s1 = _norm_act(x, weight, bias, groups, eps, scale, shift)
        out = y if conv_weight is None else torch.convolution(y, conv_weight, conv_bias, *conv_args)
        ctx.groups, ctx.eps, ctx.conv_args = groups, eps, conv_args
        ctx.save_for_backward(x, weight, bias, mean, rstd, s1, shift, conv_weight, conv_bias)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd, s1, shift, conv_weight, conv_bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_conv_weight = grad_conv_bias = None
        n = _native_group_norm(x, weight, bias, ctx.groups, ctx.eps)[0]
        m = n if s1 is None else (n * s1).add_(shift)
        if conv_weight is not None:  # as autograd's ConvolutionBackward0
            bias_sizes = None if conv_bias is None else [conv_bias.shape[0]]
            grad, grad_conv_weight, grad_conv_bias = torch.ops.aten.convolution_backward(
                grad, F.silu(m), conv_weight, bias_sizes, *ctx.conv_args, [True, needs[7], needs[8]]
            )
        grad_scale = grad_shift = None
        if s1 is not None:
            grad_m = torch.ops.aten.silu_backward(grad, m)
            if needs[6]:
                grad_shift = grad_m.sum_to_size(shift.shape)
            if needs[5]:
                grad_scale = (grad_m * n).sum_to_size(s1.shape)
            grad_n = grad_m * s1
        else:
            grad_n = torch.ops.aten.silu_backward(grad, n)
        del n, m
        # As autograd's own GroupNorm backward: the gradient in the input's memory layout.
        layout = torch.contiguous_format
        if x.device.type == "cpu" and not x.is_contiguous():  # then channels-last (see group_norm_silu)
            layout = torch.channels_last
        grad_n = grad_n.contiguous(memory_format=layout)
        batch, channels = x.shape[:2]
        grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
            grad_n, x, mean, rstd, weight, batch, channels, x[0, 0].numel(), ctx.groups, list(needs[:3]),
        )
        return (grad_x, grad_w, grad_b, None, None, grad_scale, grad_shift,
                grad_conv_weight, grad_conv_bias, None)


def _native_group_norm(x, weight, bias, groups, eps):
    batch, channels = x.shape[:2]
    return torch.native_group_norm(x, weight, bias, batch, channels, x[0, 0].numel(), groups, eps)


def _norm_act(x, weight, bias, groups, eps, scale, shift):
    """silu(group_norm(x) [* (1 + scale) + shift]) with the statistics and 1 + scale."""
    n, mean, rstd = _native_group_norm(x, weight, bias, groups, eps)
    s1 = None
    if scale is not None:
        s1 = 1 + scale
        n = (n * s1).add_(shift)
    return F.silu(n), mean, rstd, s1


def _plain_conv_args(conv):
    """``torch.convolution``'s arguments after input, weight and bias for the module ``conv``,
    or None when its forward is not a plain zero-padded convolution."""
    if type(conv) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d):  # subclasses may change forward
        return None
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.weight.dtype != torch.float32:
        return None
    dims = conv.weight.dim() - 2
    return (list(conv.stride), list(conv.padding), list(conv.dilation), False, [0] * dims, conv.groups)


def group_norm_silu(norm, x, scale=None, shift=None, conv=None):
    """SiLU(norm(x)) (or SiLU(norm(x) * (1 + scale) + shift)) for a float32 `GroupNorm32` ``norm``,
    then ``conv`` of it when given, keeping only ``x`` for the backward pass, which
    recomputes the rest (see `_GroupNormSiLU`).

    Returns None where that does not apply (other dtypes, unusual memory layouts or
    convolutions); the caller then runs the plain layers.
    """
    if x.dtype != torch.float32 or norm.weight is None or norm.weight.dtype != torch.float32:
        return None
    if torch.is_autocast_enabled(x.device.type):  # the backward pass would recompute in another dtype
        return None
    channels_last_cpu = x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(
        memory_format=torch.channels_last
    )
    if not (x.is_contiguous() or channels_last_cpu):  # the layouts group_norm itself would use
        return None
    if scale is not None and (scale.dtype != torch.float32 or shift.dtype != torch.float32):
        return None
    conv_weight = conv_bias = conv_args = None
    if conv is not None:
        conv_args = _plain_conv_args(conv)
        if conv_args is None:
            return None
        conv_weight, conv_bias = conv.weight, conv.bias
    return _GroupNormSiLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps, scale, shift,
                                conv_weight, conv_bias, conv_args)


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
