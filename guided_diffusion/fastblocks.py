"""The fast paths of the UNet's blocks, and when each one applies.

`unet.ResBlock`, `unet.AttentionBlock` and `unet.attention` compute what the
original computes, module by module; each first asks this module for a faster way
to the same result (`resblock_forward`, `attention_block_forward`, `attention`),
which answers None where none applies. Every path here is one of the named fast
paths of guided_diffusion/fastpaths.py (``recompute``, ``inplace``, ``token_attention``,
``sdpa``, ``cpu_attention``) and gives the plain path's numbers: bit for bit, except
the SDPA kernels (GPUs, and CPU bfloat16 sampling), which agree within float
rounding. tests/test_perf.py holds the equivalence tests.

A fast path regroups or skips module calls and writes into fresh outputs, so it
steps aside for any block whose layers carry a forward hook (or when a global one
exists): hooks must fire and see exactly what a layer returned.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fastpaths, kernels

# ---------------------------------------------------------------------------
# When


def _hooked(*modules):
    """Whether any of ``modules`` has a forward (pre-)hook, or a global one exists."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules) or bool(
        nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    )


def _recomputing(device_type):
    """Whether the ``recompute`` fast path applies now: a gradient is being recorded,
    outside torch.compile (which plans its own recomputation) and autocast (whose
    backward pass would recompute in another dtype)."""
    return (
        fastpaths.enabled("recompute")
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled(device_type)
    )


def _add(first, second, into):
    """``first + second`` as the plain forward adds them, written into ``into`` (whichever of
    them is a layer's fresh output) with the ``inplace`` fast path, where the sum would
    take its memory layout anyway: when it is the first operand (the other one the same
    shape or broadcast over it, like a timestep embedding), or when both operands
    share shape and strides. Otherwise the layout of the sum, and with it the rounding
    of the convolutions after it, could change.
    """
    if fastpaths.enabled("inplace"):
        if into is first:
            return into.add_(second)
        if first.shape == second.shape and first.stride() == second.stride():
            return into.add_(first)
    return first + second


# ---------------------------------------------------------------------------
# Attention


def _recompute_weights(q):
    """Whether training attention should recompute its [T, T] weights (fast path ``recompute``).

    Per head, an attention block trained module by module stores the [T, T] weights
    and about eight [C, T] tensors (the norm's input and output, q/k/v, the scaled q
    and k, the output before its projection). The weights are recomputed only where
    T > 14C, where they weigh more than 1.75 times all the rest: there the
    recomputation (a second q.k product and softmax) buys most of the block's
    memory; below it, it would cost ~2% of a training step for a modest saving.
    """
    channels, length = q.shape[1:]
    return length > 14 * channels and _recomputing(q.device.type)


def attention(q, k, v, plain):
    """A faster way to ``plain(q, k, v)`` (the original's attention formula), or None.

    GPUs: `kernels.attention_sdpa` (fast path ``sdpa``). CPU: the original's formula
    itself, whose two batched matmuls and float32 softmax are already the fastest
    CPU kernels for these 3-D tensors (SDPA's CPU path for them is its slow generic
    one) and whose rounding the golden results depend on: x0 predictions at large t
    magnify the model's last bit. With ``cpu_attention`` off, CPU float32 / float64
    use SDPA too; float16 keeps the formula, which rounds the logits and weights to
    float16 like the original. In training the formula may recompute its weights
    in the backward pass (`_recompute_weights`).
    """
    if fastpaths.enabled("sdpa"):
        if q.device.type != "cpu":
            return kernels.attention_sdpa(q, k, v)
        if not fastpaths.enabled("cpu_attention") and q.dtype != torch.float16:
            return kernels.attention_sdpa(q, k, v)
    if _recompute_weights(q):
        return kernels.recomputing(plain, q, k, v)
    return None


def _token_layout(block, x):
    """Whether `_attention_block_tokens` may stand in for the module-by-module forward.

    Only with the ``token_attention`` and ``sdpa`` fast paths on and for the two stock
    attention modules (read from the class itself: a subclass may compute something
    else). On CPU only for bfloat16 and where no gradient is recorded: float32 and
    float64 keep the original's [N, C, T] roundings (its 1x1 convolutions and matmul
    order, which the golden results depend on), float16 its float16 roundings, and
    CPU training saves its memory with recomputed weights instead.
    """
    if not (fastpaths.enabled("token_attention") and fastpaths.enabled("sdpa")):
        return False
    if x.device.type == "cpu" and (torch.is_grad_enabled() or x.dtype != torch.bfloat16):
        return False
    return vars(type(block.attention)).get("split_heads_first") is not None


def _attention_block_tokens(block, x):
    """`unet.AttentionBlock` on token-major tensors: [N, T, C] activations, [N, heads, T, C/heads] heads.

    The 1x1 projections become matrix products over the channel axis and the
    attention runs in `scaled_dot_product_attention`'s fused kernels, which never
    store the [T, T] weights for the backward pass. Channels-last inputs need no
    copy at all; for contiguous (NCHW) inputs the residual add writes the result
    back in x's layout. Equal to the module-by-module forward up to float rounding.
    """
    batch, channels, *spatial = x.shape
    heads = block.attention.n_heads
    width = channels // heads
    h = block.norm(x).flatten(2).transpose(1, 2)  # [N, T, C]; a view for channels-last x
    qkv = F.linear(h, block.qkv.weight.flatten(1), block.qkv.bias)  # [N, T, 3C]
    length = qkv.shape[1]
    if block.attention.split_heads_first:  # channels ordered (head, q/k/v, c)
        q, k, v = qkv.view(batch, length, heads, 3, width).unbind(3)
    else:  # channels ordered (q/k/v, head, c)
        q, k, v = qkv.view(batch, length, 3, heads, width).unbind(2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out.transpose(1, 2).reshape(batch, length, channels)  # channel = head * width + c
    out = F.linear(out, block.proj_out.weight.flatten(1), block.proj_out.bias)
    out = out.transpose(1, 2).reshape(batch, channels, *spatial)  # a channels-last view
    if out.stride() == x.stride():
        return out.add_(x)
    return x + out  # the first operand sets the layout of the sum: x's


def attention_block_forward(block, x):
    """`unet.AttentionBlock`'s forward by a fast path, or None where the plain forward must run.

    Token-major with fused attention where `_token_layout` allows it; otherwise the
    same modules with the residual added into the output projection's fresh result
    (fast path ``inplace``).
    """
    if _hooked(block.norm, block.qkv, block.attention, block.proj_out):
        return None
    if _token_layout(block, x):
        return _attention_block_tokens(block, x)
    if not fastpaths.enabled("inplace"):
        return None
    batch, channels, *spatial = x.shape
    x = x.reshape(batch, channels, -1)
    h = block.proj_out(block.attention(block.qkv(block.norm(x))))
    return _add(x, h, into=h).reshape(batch, channels, *spatial)


# ---------------------------------------------------------------------------
# ResBlock


def _plain_norm_act(norm, x, scale=None, shift=None, conv=None, inplace=False):
    """conv(SiLU(norm(x) [* (1 + scale) + shift])) with the plain layers; ``inplace`` reuses
    the normalisation's fresh output for the modulation and activation."""
    h = norm(x)
    if scale is not None:
        h = h.mul_(1 + scale) if inplace else h * (1 + scale)
        h = h.add_(shift)  # a fresh tensor either way
    h = F.silu(h, inplace=inplace)
    return h if conv is None else conv(h)


def _recomputed_norm_act(norm, x, scale=None, shift=None, conv=None):
    """`_plain_norm_act` keeping only x for the backward pass where `kernels.group_norm_silu` applies."""
    out = kernels.group_norm_silu(norm, x, scale, shift, conv)
    return _plain_norm_act(norm, x, scale, shift, conv) if out is None else out


def _in_place_norm_act(norm, x, scale=None, shift=None, conv=None):
    return _plain_norm_act(norm, x, scale, shift, conv, inplace=True)


def resblock_forward(block, x, emb):
    """`unet.ResBlock`'s forward by a fast path, or None where the plain forward must run.

    In training (fast path ``recompute``, not with `use_checkpoint`, which recomputes
    everything anyway) each GroupNorm-SiLU pair, with the scale-shift and the
    convolution after it, keeps only its input for the backward pass
    (`kernels.group_norm_silu`): two or three activation-sized tensors fewer for a
    little more time. While sampling (no gradient recorded; fast path ``inplace``)
    the activations run in place on the normalisations' fresh outputs. Either way the
    residual and embedding adds write into the convolutions' fresh outputs (fast path
    ``inplace``; autograd never needs a convolution's output). Same numbers and
    gradients as the plain forward, bit for bit.
    """
    recompute = not block.use_checkpoint and _recomputing(block.in_layers[0].weight.device.type)
    sampling_in_place = fastpaths.enabled("inplace") and not torch.is_grad_enabled()
    if not (recompute or sampling_in_place):
        return None
    if _hooked(block.in_layers, *block.in_layers, block.out_layers, *block.out_layers):
        return None
    norm_act = _recomputed_norm_act if recompute else _in_place_norm_act

    in_norm, _, in_conv = block.in_layers
    if block.updown:
        h = in_conv(block.h_upd(norm_act(in_norm, x)))
        x = block.x_upd(x)
    else:
        h = norm_act(in_norm, x, conv=in_conv)
    emb_out = block.emb_layers(emb).to(h.dtype)
    emb_out = emb_out.reshape(emb_out.shape + (1,) * (h.dim() - emb_out.dim()))
    scale = shift = None
    if block.use_scale_shift_norm:
        scale, shift = emb_out.chunk(2, dim=1)
    else:
        h = _add(h, emb_out, into=h)
    out_norm, _, dropout, out_conv = block.out_layers
    if dropout.training and dropout.p > 0:  # a dropout mask sits between activation and convolution
        h = out_conv(dropout(norm_act(out_norm, h, scale, shift)))
    else:
        h = norm_act(out_norm, h, scale, shift, conv=out_conv)
    return _add(h, block.skip_connection(x), into=h)
