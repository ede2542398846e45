"""The ADM networks: the diffusion UNet, the super-resolution UNet and the noisy-image classifier.

Module and parameter names follow OpenAI's released checkpoints exactly
(`input_blocks.N.M...`, `middle_block`, `output_blocks`, `out`, `time_embed`,
`label_emb`), so those files load with `strict=True`.

Layout of the UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", Sec. 3):
an input convolution, then per resolution level `num_res_blocks` ResBlocks (each
followed by an AttentionBlock at the resolutions listed in `attention_resolutions`,
given as downsampling factors) and a downsampling step; a middle ResBlock /
AttentionBlock / ResBlock; the mirror-image decoder, which concatenates the
matching encoder activation before each ResBlock; and a GroupNorm-SiLU-conv head.

The blocks compute what the original computes, module by module; ResBlock,
AttentionBlock and `attention` first ask guided_diffusion/fastblocks.py for a
faster way to the same numbers (recomputation in training, in-place ops, fused
attention kernels), which answers None where none applies.
"""

import math
from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fastblocks, fastpaths
from .errors import usage
from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    SiLU,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)

# ---------------------------------------------------------------------------
# Attention maths


def attention_reference(q, k, v):
    """Softmax attention as the original ADM code computes it.

    q, k, v: [N, C, T] (channels first, one row per head). Each of q and k is scaled
    by C^(-1/4) before the product (more stable in float16 than scaling the product),
    the softmax runs in float32 (and float64 weights are rounded through it, as in
    the original). Returns [N, C, T]. The scale is the original's expression, equal
    to C ** -0.25 in float32 but not always in float64.
    """
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    weight = torch.einsum("nct,ncs->nts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    return torch.einsum("nts,ncs->nct", weight, v)


def attention(q, k, v):
    """Softmax attention over [N, C, T] heads: `attention_reference`, or a kernel that gives
    its numbers (within float rounding on GPUs) where `fastblocks.attention` has one."""
    fast = fastblocks.attention(q, k, v, attention_reference)
    return attention_reference(q, k, v) if fast is None else fast


def count_flops_attn(model, _x, y):
    """A `thop` counting hook: add the two attention matmuls of output `y[0]` to `model.total_ops`."""
    batch, channels, *spatial = y[0].shape
    tokens = 1
    for s in spatial:
        tokens *= s
    # q.k and weight.v each cost tokens^2 * channels multiply-adds per sample.
    model.total_ops += torch.DoubleTensor([2 * batch * tokens**2 * channels])


def _check_qkv(qkv, n_heads):
    width = qkv.shape[1]
    if width % (3 * n_heads) != 0:
        raise ValueError(
            f"qkv tensor has {width} channels, which is not 3 * n_heads * head_channels for "
            f"n_heads={n_heads}; pass a width divisible by {3 * n_heads} or change the number of heads."
        )
    return width // (3 * n_heads)


class QKVAttentionLegacy(nn.Module):
    """Multi-head attention on a [B, 3*H*C, T] qkv tensor split into heads first, then into q, k, v.

    This is the channel order of the original ADM / improved-diffusion checkpoints.
    """

    split_heads_first = True  # qkv channels ordered (head, q/k/v, channel); read by the token-major fast path

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        batch, _, length = qkv.shape
        ch = _check_qkv(qkv, self.n_heads)
        q, k, v = qkv.reshape(batch * self.n_heads, 3 * ch, length).split(ch, dim=1)
        return attention(q, k, v).reshape(batch, -1, length)

    @staticmethod
    def count_flops(model, _x, y):
        return count_flops_attn(model, _x, y)


class QKVAttention(nn.Module):
    """Multi-head attention on a [B, 3*H*C, T] qkv tensor split into q, k, v first, then into heads."""

    split_heads_first = False  # qkv channels ordered (q/k/v, head, channel); read by the token-major fast path

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        batch, _, length = qkv.shape
        ch = _check_qkv(qkv, self.n_heads)
        q, k, v = (t.reshape(batch * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        return attention(q, k, v).reshape(batch, -1, length)

    @staticmethod
    def count_flops(model, _x, y):
        return count_flops_attn(model, _x, y)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the spatial mean attends over all positions (+ learnt positions).

    Input [B, C, H, W] with H*W == spacial_dim**2; output [B, output_dim or C].
    """

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        if embed_dim % num_heads_channels != 0:
            raise ValueError(
                f"AttentionPool2d: embed_dim={embed_dim} is not divisible by num_heads_channels="
                f"{num_heads_channels}; pick a head width that divides the channel count."
            )
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        batch, channels = x.shape[:2]
        x = x.reshape(batch, channels, -1)
        positions = self.positional_embedding.shape[1]
        if x.shape[2] + 1 != positions:
            raise ValueError(
                f"AttentionPool2d was built for {positions - 1} spatial positions but got an input of "
                f"spatial shape {tuple(x.shape[2:])} ({x.shape[2]} positions); the classifier's attention "
                f"pool only works at the image size it was built for (or use --classifier_pool adaptive)."
            )
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]


# ---------------------------------------------------------------------------
# Blocks


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to `x` given the timestep embedding `emb`."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that passes the timestep embedding to the children that take one."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution.

    For dims=3 only the inner two (spatial) dimensions are upsampled.
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError(
                f"Upsample without a convolution cannot change the channel count "
                f"({channels} -> {self.out_channels}); pass use_conv=True or out_channels={channels}."
            )

    def forward(self, x):
        _check_channels(x, self.channels, "Upsample")
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution or by average pooling.

    For dims=3 only the inner two (spatial) dimensions are downsampled.
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=1)
        elif self.out_channels != channels:
            raise ValueError(
                f"Downsample by average pooling cannot change the channel count "
                f"({channels} -> {self.out_channels}); pass use_conv=True or out_channels={channels}."
            )
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        _check_channels(x, self.channels, "Downsample")
        return self.op(x)


def _check_channels(x, expected, where):
    if x.shape[1] != expected:
        raise ValueError(f"{where} expects {expected} input channels but got a tensor of shape {tuple(x.shape)}.")


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally changing size and width.

    h = conv(SiLU(norm(x))); then either h + emb (default) or, with
    `use_scale_shift_norm`, norm(h) * (1 + scale) + shift (the AdaGN of Dhariwal &
    Nichol); then SiLU, dropout and a zero-initialised conv; plus a skip connection
    (identity, 1x1 conv, or 3x3 conv with `use_conv`). `up`/`down` resample both
    branches between the first normalisation and the first convolution.
    """

    def __init__(
        self,
        channels,                     # input channels
        emb_channels,                 # width of the timestep embedding
        dropout,                      # dropout probability before the last conv
        out_channels=None,            # output channels (default: channels)
        use_conv=False,               # 3x3 instead of 1x1 conv on the skip path when widths differ
        use_scale_shift_norm=False,   # condition by scale and shift (AdaGN) instead of addition
        dims=2,                       # 1-D, 2-D or 3-D data
        use_checkpoint=False,         # recompute activations in the backward pass to save memory
        up=False,                     # upsample 2x
        down=False,                   # downsample 2x
    ):
        super().__init__()
        if up and down:
            raise ValueError("ResBlock cannot both upsample and downsample; pass at most one of up=True, down=True.")
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        out_ch = self.out_channels

        self.in_layers = nn.Sequential(
            normalization(channels),
            SiLU(),
            conv_nd(dims, channels, out_ch, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            SiLU(),
            linear(emb_channels, 2 * out_ch if use_scale_shift_norm else out_ch),
        )
        self.out_layers = nn.Sequential(
            normalization(out_ch),
            SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, out_ch, out_ch, 3, padding=1)),
        )
        if out_ch == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, out_ch, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, out_ch, 1)

    def forward(self, x, emb):
        """x: [N, C, ...] features, emb: [N, emb_channels] timestep embedding -> [N, out_channels, ...]."""
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        fast = fastblocks.resblock_forward(self, x, emb)
        if fast is not None:
            return fast
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.reshape(emb_out.shape + (1,) * (h.dim() - emb_out.dim()))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        # h first: the sum takes the convolution's memory layout (channels-last stays so).
        return h + self.skip_connection(x)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection.

    Heads: `num_heads` of them, or, when `num_head_channels` is not -1, as many as
    fit `num_head_channels` channels each. `use_new_attention_order` picks
    `QKVAttention` (split q/k/v, then heads) over `QKVAttentionLegacy`.
    Works on inputs with any number of spatial dimensions.
    """

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if num_head_channels <= 0 or channels % num_head_channels != 0:
                raise usage(ValueError(
                    f"AttentionBlock: {channels} channels cannot be split into heads of "
                    f"num_head_channels={num_head_channels}; choose --num_head_channels dividing {channels} "
                    f"(or -1 to use --num_heads)."
                ))
            self.num_heads = channels // num_head_channels
        if self.num_heads <= 0 or channels % self.num_heads != 0:
            raise usage(ValueError(
                f"AttentionBlock: {channels} channels cannot be split into num_heads={self.num_heads} "
                f"equal heads; choose --num_heads dividing {channels}."
            ))
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        attention_cls = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = attention_cls(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        """x: [N, C, *spatial] -> same shape."""
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x):
        fast = fastblocks.attention_block_forward(self, x)
        if fast is not None:
            return fast
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(batch, channels, *spatial)


# ---------------------------------------------------------------------------
# Shared construction of the encoder half


class _Blocks:
    """Builds the blocks of one network with its shared options (keeps constructors short)."""

    def __init__(self, *, emb_channels, dropout, dims, use_checkpoint, use_scale_shift_norm,
                 num_head_channels, use_new_attention_order, conv_resample, resblock_updown):
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.dims = dims
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.num_head_channels = num_head_channels
        self.use_new_attention_order = use_new_attention_order
        self.conv_resample = conv_resample
        self.resblock_updown = resblock_updown

    def res(self, channels, out_channels=None, up=False, down=False):
        return ResBlock(
            channels, self.emb_channels, self.dropout, out_channels=out_channels, dims=self.dims,
            use_checkpoint=self.use_checkpoint, use_scale_shift_norm=self.use_scale_shift_norm,
            up=up, down=down,
        )

    def attn(self, channels, num_heads):
        return AttentionBlock(
            channels, num_heads=num_heads, num_head_channels=self.num_head_channels,
            use_checkpoint=self.use_checkpoint, use_new_attention_order=self.use_new_attention_order,
        )

    def down(self, channels):
        if self.resblock_updown:
            return self.res(channels, channels, down=True)
        return Downsample(channels, self.conv_resample, dims=self.dims, out_channels=channels)

    def up(self, channels):
        if self.resblock_updown:
            return self.res(channels, channels, up=True)
        return Upsample(channels, self.conv_resample, dims=self.dims, out_channels=channels)


def _keep_settings(module, **settings):
    """Keep a network's constructor settings as attributes, as the original's networks expose them."""
    for name, value in settings.items():
        setattr(module, name, value)


def _time_embed(model_channels):
    dim = model_channels * 4
    return nn.Sequential(linear(model_channels, dim), SiLU(), linear(dim, dim))


def _build_encoder(blocks, in_channels, model_channels, channel_mult, num_res_blocks,
                   attention_resolutions, num_heads):
    """Input blocks and middle block. Returns (input_blocks, middle_block, skip widths, final width, final ds)."""
    ch = int(channel_mult[0] * model_channels)
    input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(blocks.dims, in_channels, ch, 3, padding=1))])
    widths = [ch]
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            out_ch = int(mult * model_channels)
            layers = [blocks.res(ch, out_ch)]
            ch = out_ch
            if ds in attention_resolutions:
                layers.append(blocks.attn(ch, num_heads))
            input_blocks.append(TimestepEmbedSequential(*layers))
            widths.append(ch)
        if level != len(channel_mult) - 1:
            input_blocks.append(TimestepEmbedSequential(blocks.down(ch)))
            widths.append(ch)
            ds *= 2
    middle_block = TimestepEmbedSequential(blocks.res(ch), blocks.attn(ch, num_heads), blocks.res(ch))
    return input_blocks, middle_block, widths, ch, ds


def _check_input(x, in_channels, dims, num_levels, who):
    if x.dim() != dims + 2 or x.shape[1] != in_channels:
        raise ValueError(
            f"{who} expects input of shape [batch, {in_channels}, {', '.join(['size'] * dims)}], "
            f"got {tuple(x.shape)}."
        )
    factor = 2 ** (num_levels - 1)
    resampled = x.shape[3:] if dims == 3 else x.shape[2:]
    if any(s % factor for s in resampled):
        raise usage(ValueError(
            f"{who} halves the resolution {num_levels - 1} times (len(channel_mult)={num_levels}), so the "
            f"spatial sizes must be multiples of {factor}; got {tuple(x.shape[2:])}. Resize or pad the input, "
            f"or build the model with a shorter --channel_mult."
        ))


def _embed_timesteps(timesteps, batch, model_channels, device):
    if not torch.is_tensor(timesteps):
        timesteps = torch.as_tensor(timesteps, device=device)
    if timesteps.dim() == 0:
        timesteps = timesteps.expand(batch)
    if timesteps.shape != (batch,):
        raise ValueError(
            f"timesteps must be a scalar or a 1-D tensor with one entry per batch element ({batch}); "
            f"got shape {tuple(timesteps.shape)}."
        )
    return timestep_embedding(timesteps, model_channels)


# ---------------------------------------------------------------------------
# Networks


class UNetModel(nn.Module):
    """The ADM UNet with timestep (and optional class) conditioning.

    forward(x, timesteps, y=None): x [N, in_channels, *spatial], timesteps [N] (int or
    float), y [N] int64 labels when `num_classes` is set; returns [N, out_channels, *spatial]
    in x's dtype. A label of -1 is the null label: that row gets no class embedding, its
    unconditional prediction for classifier-free guidance. It adds no parameter, so
    `label_emb.weight` keeps the original's shape [num_classes, 4 * model_channels].
    """

    def __init__(
        self,
        image_size,                   # nominal resolution (stored; any compatible size runs)
        in_channels,                  # channels of x
        model_channels,               # base width
        out_channels,                 # channels of the output (6 when the variance is learnt)
        num_res_blocks,               # ResBlocks per level (decoder: one more)
        attention_resolutions,        # downsampling factors (1, 2, 4, ...) that get attention
        dropout=0,                    # dropout probability inside ResBlocks
        channel_mult=(1, 2, 4, 8),    # width multiplier per level (may be fractional)
        conv_resample=True,           # learnt 3x3 convs for up/downsampling
        dims=2,                       # 1-D, 2-D or 3-D data
        num_classes=None,             # class-conditional with this many labels
        use_checkpoint=False,         # gradient checkpointing in every block
        use_fp16=False,               # run the torso in float16 (after convert_to_fp16())
        num_heads=1,                  # attention heads (when num_head_channels == -1)
        num_head_channels=-1,         # fixed channels per head instead of a fixed head count
        num_heads_upsample=-1,        # heads in the decoder (-1: same as num_heads)
        use_scale_shift_norm=False,   # AdaGN conditioning in ResBlocks
        resblock_updown=False,        # ResBlocks instead of plain up/downsampling layers
        use_new_attention_order=False,  # QKVAttention instead of QKVAttentionLegacy
    ):
        super().__init__()
        fastpaths.tune_allocator()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        _keep_settings(
            self, image_size=image_size, in_channels=in_channels, model_channels=model_channels,
            out_channels=out_channels, num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions,
            dropout=dropout, channel_mult=channel_mult, conv_resample=conv_resample, dims=dims,
            num_classes=num_classes, use_checkpoint=use_checkpoint, num_heads=num_heads,
            num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
        )
        self.dtype = torch.float16 if use_fp16 else torch.float32

        emb_dim = model_channels * 4
        blocks = _Blocks(
            emb_channels=emb_dim, dropout=dropout, dims=dims, use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm, num_head_channels=num_head_channels,
            use_new_attention_order=use_new_attention_order, conv_resample=conv_resample,
            resblock_updown=resblock_updown,
        )
        self.time_embed = _time_embed(model_channels)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)
        self.input_blocks, self.middle_block, widths, ch, ds = _build_encoder(
            blocks, in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions, num_heads
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out_ch = int(model_channels * mult)
                layers = [blocks.res(ch + widths.pop(), out_ch)]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(blocks.attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(blocks.up(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            SiLU(),
            zero_module(conv_nd(dims, ch, out_channels, 3, padding=1)),
        )

    def convert_to_fp16(self):
        """Cast the torso's convolutions to float16 (embeddings, norms and the head stay float32)."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f16)
        self.dtype = torch.float16

    def convert_to_fp32(self):
        """Undo `convert_to_fp16`."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f32)
        self.dtype = torch.float32

    def _torso_dtype(self):
        # The first conv's dtype, not `self.dtype`: a use_fp16 model not yet converted still runs.
        return self.input_blocks[0][0].weight.dtype

    def forward(self, x, timesteps, y=None):
        """Predict the network output for noisy images `x` at `timesteps` (labels `y` if class-conditional)."""
        if (y is None) != (self.num_classes is None):
            if y is None:
                raise ValueError(
                    f"this UNetModel is class-conditional (num_classes={self.num_classes}) and needs labels: "
                    f"call model(x, timesteps, y=labels) with int64 labels of shape [{x.shape[0]}]."
                )
            raise ValueError(
                "this UNetModel is unconditional (num_classes=None) but labels y were given; drop y, "
                "or build a class-conditional model (--class_cond True)."
            )
        _check_input(x, self.in_channels, self.dims, len(self.channel_mult), type(self).__name__)
        emb = self.time_embed(_embed_timesteps(timesteps, x.shape[0], self.model_channels, x.device))
        if y is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(
                    f"labels y must have shape [{x.shape[0]}] (one int per image), got {tuple(y.shape)}."
                )
            emb = emb + self._class_embedding(y)

        h = x.to(self._torso_dtype())
        skips = []
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        head = self.out[-1].weight.dtype
        return self.out(h.to(head)).to(x.dtype)


    def _class_embedding(self, y):
        """label_emb(y), and zeros for rows with the null label -1 (exactly label_emb(y) without any)."""
        if y.device.type == "cpu" and y.numel() and (int(y.min()) < -1 or int(y.max()) >= self.num_classes):
            raise ValueError(
                f"class labels must lie in 0..{self.num_classes - 1}, or be -1 for no class (classifier-free "
                f"guidance); got values in [{int(y.min())}, {int(y.max())}]."
            )
        known = y >= 0
        embedding = self.label_emb(y.clamp(min=0))
        return torch.where(known[:, None], embedding, torch.zeros((), dtype=embedding.dtype, device=y.device))


class SuperResModel(UNetModel):
    """A UNet that also sees a low-resolution image, upsampled bilinearly and stacked on channels.

    forward(x, timesteps, low_res=..., **kwargs): low_res [N, in_channels, h, w].
    """

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        if low_res is None:
            raise ValueError(
                "SuperResModel needs the low-resolution image: call model(x, timesteps, low_res=small) "
                "(model_kwargs={'low_res': ...} when sampling)."
            )
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return super().forward(torch.cat([x, upsampled.to(x.dtype)], dim=1), timesteps, **kwargs)


class EncoderUNetModel(nn.Module):
    """The encoder half of the UNet with a pooling head: ADM's noisy-image classifier.

    pool: "adaptive" (global average, 1x1 conv), "attention" (AttentionPool2d; needs
    num_head_channels), "spatial" (MLP on the spatial means of every block's output)
    or "spatial_v2" (the same with GroupNorm and SiLU). forward(x, timesteps) -> [N, out_channels].
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        super().__init__()
        fastpaths.tune_allocator()
        if pool not in ("adaptive", "attention", "spatial", "spatial_v2"):
            raise usage(NotImplementedError(
                f"unknown classifier pool {pool!r}; choose --classifier_pool adaptive, attention, spatial "
                f"or spatial_v2."
            ))
        if pool == "attention" and num_head_channels == -1:
            raise usage(ValueError(
                "the attention pool needs a head width: pass num_head_channels (e.g. 64), "
                "or use --classifier_pool adaptive."
            ))
        _keep_settings(
            self, image_size=image_size, in_channels=in_channels, model_channels=model_channels,
            out_channels=out_channels, num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions,
            dropout=dropout, channel_mult=channel_mult, conv_resample=conv_resample, dims=dims,
            use_checkpoint=use_checkpoint, num_heads=num_heads, num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample, pool=pool,
        )
        self.dtype = torch.float16 if use_fp16 else torch.float32

        blocks = _Blocks(
            emb_channels=model_channels * 4, dropout=dropout, dims=dims, use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm, num_head_channels=num_head_channels,
            use_new_attention_order=use_new_attention_order, conv_resample=conv_resample,
            resblock_updown=resblock_updown,
        )
        self.time_embed = _time_embed(model_channels)
        self.input_blocks, self.middle_block, widths, ch, ds = _build_encoder(
            blocks, in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions, num_heads
        )
        # The spatial heads read the mean of every input block's output and of the middle block's.
        self._feature_size = sum(widths) + ch

        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            self.out = nn.Sequential(
                normalization(ch),
                SiLU(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                nn.ReLU(),
                nn.Linear(2048, out_channels),
            )
        else:
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                normalization(2048),
                SiLU(),
                nn.Linear(2048, out_channels),
            )

    def convert_to_fp16(self):
        """Cast the torso's convolutions to float16 (embeddings, norms and the head stay float32)."""
        for part in (self.input_blocks, self.middle_block):
            part.apply(convert_module_to_f16)
        self.dtype = torch.float16

    def convert_to_fp32(self):
        """Undo `convert_to_fp16`."""
        for part in (self.input_blocks, self.middle_block):
            part.apply(convert_module_to_f32)
        self.dtype = torch.float32

    def forward(self, x, timesteps):
        """Class logits [N, out_channels] for noisy images `x` at `timesteps`."""
        _check_input(x, self.in_channels, self.dims, len(self.channel_mult), type(self).__name__)
        emb = self.time_embed(_embed_timesteps(timesteps, x.shape[0], self.model_channels, x.device))
        spatial = self.pool.startswith("spatial")
        means = []
        h = x.to(self.input_blocks[0][0].weight.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                means.append(h.to(x.dtype).mean(dim=tuple(range(2, h.dim()))))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.to(x.dtype).mean(dim=tuple(range(2, h.dim()))))
            h = torch.cat(means, dim=-1)
        head = next(self.out.parameters()).dtype
        return self.out(h.to(head)).to(x.dtype)
