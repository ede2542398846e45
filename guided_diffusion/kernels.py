"""Kernels that compute what a composition of the network's plain layers computes.

Each one stands in for a few layers of a block (guided_diffusion/fastblocks.py
decides when) and gives that composition's numbers: bit for bit where it runs the
same kernels, within float rounding where it runs others (`attention_sdpa`).
tests/test_perf.py holds the equivalence tests that are their contract.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def attention_sdpa(q, k, v):
    """Softmax attention over [N, C, T] heads via `scaled_dot_product_attention`.

    Its default scale 1/sqrt(C) equals the original's C^(-1/4) on q and k each; GPUs
    get the flash / memory-efficient kernels. Equal to `unet.attention_reference` up
    to float rounding (a fused kernel sums in another order). Returns [N, C, T].
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def recomputing(fn, *inputs):
    """``fn(*inputs)``, keeping only ``inputs`` for the backward pass, which runs ``fn`` again.

    The same kernels run twice, so outputs and gradients equal those of ``fn``
    itself bit for bit; what is saved is every tensor ``fn`` would have stored for
    its backward pass (for attention, the [N, T, T] softmax weights). ``fn`` must not
    draw random numbers.
    """
    return torch.utils.checkpoint.checkpoint(fn, *inputs, use_reentrant=False, preserve_rng_state=False)


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
