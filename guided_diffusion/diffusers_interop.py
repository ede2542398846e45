"""ADM diffusion UNets as diffusers' ``UNet2DModel`` + ``DDPMScheduler`` folders, and back.

The ADM UNet is a ``UNet2DModel`` with positional timestep embeddings (cos first:
``flip_sin_to_cos``, no frequency shift), ``DownBlock2D`` / ``AttnDownBlock2D``
levels (``ResnetDownsampleBlock2D`` and ``downsample_type="resnet"`` with
``resblock_updown``), one ``attention_head_dim`` for every attention block, and
``resnet_time_scale_shift="scale_shift"`` for AdaGN. The weights map one to one
except attention: our ``qkv`` 1x1 convolution [3C, C, 1] becomes ``to_q``,
``to_k``, ``to_v`` [C, C]. With the legacy head order its rows are ordered
(heads, 3, d) and are permuted to (3, heads, d) first: a pure permutation.

What UNet2DModel cannot express is refused with the flag to change:
a head count fixed by ``--num_heads`` (``--num_head_channels -1``) when the
attention levels have different widths (UNet2DModel has one head *width*),
``--channel_mult`` not starting at 1 (its time embedding is ``4 * block_out_channels[0]``),
and ``--rescale_timesteps`` with T != 1000 (diffusers feeds the model the raw step).
Super-resolution UNets and classifiers are out of scope.

An exported folder holds ``unet/`` (``config.json``, ``diffusion_pytorch_model.safetensors``),
``scheduler/scheduler_config.json`` (the betas as ``trained_betas``, float64 in JSON),
``guided_diffusion.json`` (our flags, which diffusers ignores; the import uses them
to restore the exact model), and for unconditional models ``model_index.json``
(a ``DDPMPipeline``).
"""

import json
import os

import numpy as np
import torch

from . import gaussian_diffusion as gd
from .atomic import atomic_write, atomic_write_text
from .checkpoints import load_checkpoint_file
from .errors import usage
from .flags import model_and_diffusion_defaults, model_extra_defaults
from .script_util import attention_downsample_rates, betas_from_flags, parse_channel_mult

UNET_DIR, SCHEDULER_DIR = "unet", "scheduler"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
FLAGS_NAME = "guided_diffusion.json"
DIFFUSERS_VERSION = "0.42.1"  # the version whose config layout this writes (tested against it)

_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RES_BACK = {theirs: ours for ours, theirs in _RES.items()}


def _refuse(text):
    return usage(ValueError(f"cannot export to diffusers' UNet2DModel: {text}"))


# ---------------------------------------------------------------- architecture


# UNet2DModel settings that the ADM layout fixes.
_ADM_FIXED = dict(time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32,
                  attn_norm_num_groups=32, norm_eps=1e-5, act_fn="silu", center_input_sample=False,
                  mid_block_type="UNetMidBlock2D", mid_block_scale_factor=1, downsample_padding=1,
                  add_attention=True, class_embed_type=None)


class _Layout:
    """The ADM architecture the flags build, read as UNet2DModel's levels."""

    def __init__(self, flags):
        self.flags = flags
        self.base = flags["num_channels"]
        mult = parse_channel_mult(flags["channel_mult"], flags["image_size"])
        if mult[0] != 1:
            raise _refuse(
                f"--channel_mult {flags['channel_mult'] or ','.join(map(str, mult))} starts at {mult[0]}; "
                f"UNet2DModel's time embedding needs the first level at the base width (--channel_mult 1,...)."
            )
        self.widths = [int(m * self.base) for m in mult]
        self.levels = len(mult)
        self.blocks = flags["num_res_blocks"]
        rates = attention_downsample_rates(flags["attention_resolutions"], flags["image_size"], levels=self.levels)
        self.attention = [2**level in rates for level in range(self.levels)]
        self.updown = flags["resblock_updown"]
        self.head_dim = self._head_dim()
        if flags["rescale_timesteps"] and flags["diffusion_steps"] != 1000:
            raise _refuse(
                f"--rescale_timesteps True with --diffusion_steps {flags['diffusion_steps']}: the model expects "
                f"timesteps scaled to 0..1000, but diffusers passes the raw step."
            )

    def _head_dim(self):
        heads_width = self.flags["num_head_channels"]
        if heads_width != -1:
            return heads_width
        heads, heads_up = self.flags["num_heads"], self.flags["num_heads_upsample"]
        heads_up = heads if heads_up == -1 else heads_up
        attended = [w for w, a in zip(self.widths, self.attention) if a]
        dims = {w // heads for w in attended} | {self.widths[-1] // heads} | {w // heads_up for w in attended}
        if len(dims) > 1:
            raise _refuse(
                f"--num_heads {heads} with --num_head_channels -1 fixes the head count, giving head widths "
                f"{sorted(dims)} at the attention levels, and UNet2DModel has one attention_head_dim for all "
                f"blocks. Only models built with --num_head_channels N (or whose attention levels share one "
                f"head width) can be exported."
            )
        return dims.pop()

    def config(self):
        down = "ResnetDownsampleBlock2D" if self.updown else "DownBlock2D"
        up = "ResnetUpsampleBlock2D" if self.updown else "UpBlock2D"
        flags = self.flags
        return {
            "_class_name": "UNet2DModel",
            "_diffusers_version": DIFFUSERS_VERSION,
            "sample_size": flags["image_size"],
            "in_channels": flags["in_channels"],
            "out_channels": _out_channels(flags),
            **_ADM_FIXED,
            "down_block_types": ["AttnDownBlock2D" if a else down for a in self.attention],
            "up_block_types": ["AttnUpBlock2D" if a else up for a in reversed(self.attention)],
            "block_out_channels": self.widths,
            "layers_per_block": self.blocks,
            "downsample_type": "resnet" if self.updown else "conv",
            "upsample_type": "resnet" if self.updown else "conv",
            "dropout": flags["dropout"],
            "attention_head_dim": self.head_dim,
            "resnet_time_scale_shift": "scale_shift" if flags["use_scale_shift_norm"] else "default",
            "num_class_embeds": flags["num_classes"] if flags["class_cond"] else None,
        }

    def modules(self):
        """``{our module prefix: (diffusers prefix, kind)}``, kind one of plain, res, attn."""
        table = {"time_embed.0": ("time_embedding.linear_1", "plain"),
                 "time_embed.2": ("time_embedding.linear_2", "plain"),
                 "label_emb": ("class_embedding", "plain"),
                 "input_blocks.0.0": ("conv_in", "plain"),
                 "middle_block.0": ("mid_block.resnets.0", "res"),
                 "middle_block.1": ("mid_block.attentions.0", "attn"),
                 "middle_block.2": ("mid_block.resnets.1", "res"),
                 "out.0": ("conv_norm_out", "plain"),
                 "out.2": ("conv_out", "plain")}
        resample = "res" if self.updown else "plain"
        index = 1
        for level in range(self.levels):
            for block in range(self.blocks):
                table[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.resnets.{block}", "res")
                table[f"input_blocks.{index}.1"] = (f"down_blocks.{level}.attentions.{block}", "attn")
                index += 1
            if level != self.levels - 1:
                inner = "" if self.updown else ".op"
                table[f"input_blocks.{index}.0{inner}"] = (f"down_blocks.{level}.downsamplers.0" + (
                    "" if self.updown else ".conv"), resample)
                index += 1
        index = 0
        for up, level in enumerate(reversed(range(self.levels))):
            for block in range(self.blocks + 1):
                table[f"output_blocks.{index}.0"] = (f"up_blocks.{up}.resnets.{block}", "res")
                table[f"output_blocks.{index}.1"] = (f"up_blocks.{up}.attentions.{block}", "attn")
                if level and block == self.blocks:
                    sub = 2 if self.attention[level] else 1
                    inner = "" if self.updown else ".conv"
                    table[f"output_blocks.{index}.{sub}{inner}"] = (f"up_blocks.{up}.upsamplers.0{inner}", resample)
                index += 1
        return table


def _out_channels(flags):
    if flags["out_channels"] > 0:
        return flags["out_channels"]
    return flags["in_channels"] * (2 if flags["learn_sigma"] else 1)


def _complete(flags):
    """The diffusion UNet's flags, the defaults filling in those not given."""
    if "large_size" in flags or any(key.startswith("classifier_") for key in flags):
        raise _refuse("super-resolution models and classifiers are out of scope (diffusion UNets only).")
    defaults = {**model_and_diffusion_defaults(), **model_extra_defaults()}
    return {key: flags.get(key, value) for key, value in defaults.items()}


# ---------------------------------------------------------------- weights


def _heads_first_to_qkv_first(rows, heads):
    """Legacy qkv rows (heads, 3, d) -> (3, heads, d); rows is [3C, ...]."""
    return rows.reshape(heads, 3, -1, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape)


def _qkv_first_to_heads_first(rows, heads):
    """The inverse of `_heads_first_to_qkv_first`."""
    return rows.reshape(3, heads, -1, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape)


def _split_prefix(key, table):
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            return prefix, ".".join(parts[cut:])
    raise KeyError(key)


def to_diffusers_state_dict(state_dict, flags):
    """Our UNet's ``state_dict`` (built with ``flags``) as UNet2DModel's."""
    flags = _complete(flags)
    layout = _Layout(flags)
    table = layout.modules()
    legacy = not flags["use_new_attention_order"]
    out = {}
    for key, value in state_dict.items():
        prefix, rest = _split_prefix(key, table)
        target, kind = table[prefix]
        if kind == "res":
            module, _, param = rest.rpartition(".")
            out[f"{target}.{_RES[module]}.{param}"] = value
        elif kind == "plain":
            out[f"{target}.{rest}"] = value
        elif rest.startswith("norm."):
            out[f"{target}.group_norm.{rest[5:]}"] = value
        elif rest.startswith("proj_out."):
            out[f"{target}.to_out.0.{rest[9:]}"] = value.reshape(value.shape[:2]) if value.dim() == 3 else value
        else:  # qkv
            param = rest[4:]
            rows = value.reshape(value.shape[:2]) if value.dim() == 3 else value
            if legacy:
                rows = _heads_first_to_qkv_first(rows, rows.shape[0] // 3 // layout.head_dim)
            for name, part in zip(("to_q", "to_k", "to_v"), rows.chunk(3, dim=0)):
                out[f"{target}.{name}.{param}"] = part.contiguous()
    return out


def from_diffusers_state_dict(state_dict, flags):
    """UNet2DModel's ``state_dict`` as our UNet's, for the model ``flags`` build."""
    flags = _complete(flags)
    layout = _Layout(flags)
    legacy = not flags["use_new_attention_order"]
    out = {}
    for ours, (target, kind) in layout.modules().items():
        names = [key for key in state_dict if key.startswith(target + ".")]
        for key in names:
            rest = key[len(target) + 1:]
            if kind == "res":
                module, _, param = rest.rpartition(".")
                out[f"{ours}.{_RES_BACK[module]}.{param}"] = state_dict[key]
            elif kind == "plain":
                out[f"{ours}.{rest}"] = state_dict[key]
            elif rest.startswith("group_norm."):
                out[f"{ours}.norm.{rest[11:]}"] = state_dict[key]
            elif rest.startswith("to_out.0."):
                value = state_dict[key]
                out[f"{ours}.proj_out.{rest[9:]}"] = value[..., None] if value.dim() == 2 else value
            elif rest.startswith("to_q."):
                param = rest[5:]
                rows = torch.cat([state_dict[f"{target}.{n}.{param}"] for n in ("to_q", "to_k", "to_v")])
                if legacy:
                    rows = _qkv_first_to_heads_first(rows, rows.shape[0] // 3 // layout.head_dim)
                out[f"{ours}.qkv.{param}"] = rows[..., None] if rows.dim() == 2 else rows
    return out


# ---------------------------------------------------------------- scheduler and folders


def scheduler_config(flags):
    """DDPMScheduler's config for the diffusion ``flags`` describe (all T steps; respacing is a sampling choice)."""
    flags = _complete(flags)
    betas = betas_from_flags(flags["noise_schedule"], flags["diffusion_steps"],
                             schedule_shift=flags["schedule_shift"],
                             zero_terminal_snr=flags["zero_terminal_snr"])
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": flags["diffusion_steps"],
        "beta_schedule": "linear",  # ignored: trained_betas give the schedule
        "trained_betas": [float(b) for b in np.asarray(betas, dtype=np.float64)],
        "variance_type": "learned_range" if flags["learn_sigma"] else "fixed_large",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "prediction_type": "sample" if flags["predict_xstart"] else "v_prediction" if flags["predict_v"] else "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }


def _write_json(path, data):
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def export(model, flags, out_dir):
    """Write ``model`` (a ``UNetModel`` built with ``flags``) as a diffusers folder; returns its path."""
    from safetensors.torch import save as safetensors_bytes

    flags = _complete(flags)
    layout = _Layout(flags)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    tensors = to_diffusers_state_dict(state, flags)
    os.makedirs(os.path.join(out_dir, UNET_DIR), exist_ok=True)
    os.makedirs(os.path.join(out_dir, SCHEDULER_DIR), exist_ok=True)
    data = safetensors_bytes(tensors)
    atomic_write(os.path.join(out_dir, UNET_DIR, UNET_WEIGHTS), lambda f: f.write(data))
    _write_json(os.path.join(out_dir, UNET_DIR, "config.json"), layout.config())
    _write_json(os.path.join(out_dir, SCHEDULER_DIR, "scheduler_config.json"), scheduler_config(flags))
    _write_json(os.path.join(out_dir, FLAGS_NAME), flags)
    if not flags["class_cond"]:
        _write_json(os.path.join(out_dir, "model_index.json"), {
            "_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"],
        })
    return out_dir


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _attention_groups(unet_config):
    """The GroupNorm groups of the middle block's attention: diffusers drops that norm when
    ``attn_norm_num_groups`` is unset with scale-shift (AdaGN) residual blocks."""
    groups = unet_config.get("attn_norm_num_groups")
    if groups is None and unet_config.get("resnet_time_scale_shift", "default") == "default":
        groups = unet_config.get("norm_num_groups", 32)
    return groups


def _noise_schedule(scheduler, steps):
    """Our schedule name whose betas the DDPMScheduler config gives."""
    if scheduler.get("trained_betas"):
        betas = np.asarray(scheduler["trained_betas"], dtype=np.float64)
    elif scheduler.get("beta_schedule") == "squaredcos_cap_v2":
        return "cosine"
    else:
        betas = np.linspace(scheduler.get("beta_start", 1e-4), scheduler.get("beta_end", 0.02), steps)
    for name in ("linear", "cosine"):
        if np.allclose(betas, gd.get_named_beta_schedule(name, steps), rtol=1e-6, atol=1e-9):
            return name
    raise usage(ValueError(
        "the scheduler's betas are neither the linear nor the cosine schedule of "
        f"{steps} steps; guided_diffusion has no other --noise_schedule"
    ))


def flags_from_diffusers(unet_config, scheduler):
    """Our flags for a UNet2DModel config of the ADM layout and a DDPMScheduler config."""
    seen = dict(unet_config, attn_norm_num_groups=_attention_groups(unet_config))
    odd = {k: seen.get(k) for k, v in _ADM_FIXED.items() if seen.get(k, v) != v}
    if odd:
        raise usage(ValueError(
            f"this UNet2DModel is not in the ADM layout ({', '.join(f'{k}={v!r}' for k, v in odd.items())}; "
            f"ADM needs {', '.join(f'{k}={_ADM_FIXED[k]!r}' for k in odd)}); it cannot be imported"
        ))
    widths = unet_config["block_out_channels"]
    base = widths[0]
    size = unet_config["sample_size"]
    attended = [size // 2**level for level, kind in enumerate(unet_config["down_block_types"]) if "Attn" in kind]
    mults = [w / base for w in widths]
    flags = _complete({})
    flags.update(
        image_size=size, num_channels=base, num_res_blocks=unet_config["layers_per_block"],
        channel_mult=",".join(str(int(m)) if float(m).is_integer() else f"{m:g}" for m in mults),
        attention_resolutions=",".join(map(str, attended)), num_head_channels=unet_config["attention_head_dim"],
        dropout=unet_config.get("dropout", 0.0), class_cond=unet_config.get("num_class_embeds") is not None,
        use_scale_shift_norm=unet_config.get("resnet_time_scale_shift") == "scale_shift",
        resblock_updown=unet_config.get("downsample_type") == "resnet", use_new_attention_order=True,
        in_channels=unet_config["in_channels"], num_classes=unet_config.get("num_class_embeds") or 1000,
        diffusion_steps=scheduler["num_train_timesteps"],
        noise_schedule=_noise_schedule(scheduler, scheduler["num_train_timesteps"]),
        learn_sigma=scheduler.get("variance_type") == "learned_range",
        predict_xstart=scheduler.get("prediction_type") == "sample",
        predict_v=scheduler.get("prediction_type") == "v_prediction",
    )
    flags["out_channels"] = -1 if unet_config["out_channels"] == _out_channels(flags) else unet_config["out_channels"]
    return flags


def import_folder(folder):
    """(flags, state_dict of our UNet) from an exported diffusers folder.

    The flags saved by `export` are used when present (so the legacy head order and the
    named noise schedule come back exactly); otherwise they are read off the diffusers
    configs (new head order; the linear or cosine schedule that the betas match).
    """
    unet_config = _read_json(os.path.join(folder, UNET_DIR, "config.json"))
    scheduler = _read_json(os.path.join(folder, SCHEDULER_DIR, "scheduler_config.json"))
    saved = os.path.join(folder, FLAGS_NAME)
    flags = _complete(_read_json(saved)) if os.path.isfile(saved) else flags_from_diffusers(unet_config, scheduler)
    state = load_checkpoint_file(os.path.join(folder, UNET_DIR, UNET_WEIGHTS))
    return flags, from_diffusers_state_dict(state, flags)
