"""Pretrained model folders, re-headed fine-tuning and foreign checkpoint layouts.

A pretrained folder holds

- ``config.json``: every model and diffusion flag, the package version
  (``guided_diffusion_version``) and the preset the weights came from (``preset``);
- ``model.safetensors``: the model's state_dict;
- ``ema_<rate>.safetensors``: the EMA weights of each rate, when saved.

`from_pretrained` also takes a single ``.pt``/``.safetensors`` file with its config
beside it (``checkpoints.find_config``) or named after a preset (``cd_imagenet64_l2.pt``).

Fine-tuning with changed heads: the flags ``num_classes``, ``class_cond``,
``in_channels``, ``out_channels`` and ``learn_sigma`` change only the class
embedding and the first and last convolutions (`HEAD_KEYS`). `load_fitting` loads
every tensor that still fits and leaves those heads as the freshly built model
initialised them, naming them in one log line; any other mismatch stays an error.

Consistency-model checkpoints (openai/consistency_models) store the attention
``qkv`` and ``proj_out`` weights as 2-D convolutions [*, C, 1, 1]; `to_adm_layout`
squeezes them to our 1-D [*, C, 1], whatever the flags.
"""

import importlib.metadata
import os

import torch

from . import checkpoints, dist_util, logger, presets
from .atomic import atomic_write
from .flags import (
    model_and_diffusion_defaults, model_extra_defaults, sr_extra_defaults, sr_model_and_diffusion_defaults,
)
from .script_util import create_model_and_diffusion, sr_create_model_and_diffusion

WEIGHTS_NAME = "model.safetensors"
VERSION_KEY = "guided_diffusion_version"
PRESET_KEY = "preset"

# The tensors that the re-heading flags reshape, and those flags.
HEAD_KEYS = ("label_emb.weight", "input_blocks.0.0.weight", "out.2.weight", "out.2.bias")
HEAD_FLAGS = ("num_classes", "class_cond", "in_channels", "out_channels", "learn_sigma")

_ATTENTION_WEIGHTS = (".qkv.weight", ".proj_out.weight")


def _package_version():
    try:
        return importlib.metadata.version("guided_diffusion")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _is_super_res(flags):
    return "large_size" in flags


def _all_flags(flags):
    """``flags`` completed with the defaults of its model kind (diffusion or super-res UNet)."""
    if _is_super_res(flags):
        defaults = {**sr_model_and_diffusion_defaults(), **sr_extra_defaults()}
    else:
        defaults = {**model_and_diffusion_defaults(), **model_extra_defaults()}
    return {key: flags.get(key, value) for key, value in defaults.items()}


def build(flags):
    """(model, diffusion) for complete flags of a diffusion or super-resolution UNet."""
    factory = sr_create_model_and_diffusion if _is_super_res(flags) else create_model_and_diffusion
    return factory(**_all_flags(flags))


# ---------------------------------------------------------------- folders


def _ema_name(rate):
    return f"ema_{rate}.safetensors"


def _write_safetensors(path, state_dict):
    from safetensors.torch import save as safetensors_bytes

    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    data = safetensors_bytes(tensors)
    atomic_write(path, lambda f: f.write(data))


def save_pretrained(model, flags, folder, *, ema=None, preset=""):
    """Write ``model`` as a pretrained folder (see module docstring); returns the folder.

    :param flags: the model and diffusion flags that built ``model`` (missing ones are
        the defaults, so a folder always holds all of them).
    :param ema: optional ``{rate: state_dict}`` of EMA weights, each written as ``ema_<rate>.safetensors``.
    :param preset: the preset the weights came from, recorded in ``config.json``.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    _write_safetensors(os.path.join(folder, WEIGHTS_NAME), state)
    for rate, ema_state in (ema or {}).items():
        _write_safetensors(os.path.join(folder, _ema_name(rate)), ema_state)
    config = dict(_all_flags(flags), **{VERSION_KEY: _package_version(), PRESET_KEY: preset})
    checkpoints.save_config(folder, config)
    return folder


def weights_file(path, *, ema_rate=None, flag=None):
    """The weights file of ``path``: a pretrained folder's ``model.safetensors`` (or its
    ``ema_<rate>.safetensors``), else ``path`` itself."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    name = WEIGHTS_NAME if ema_rate is None else _ema_name(ema_rate)
    candidate = os.path.join(path, name)
    if not os.path.isfile(candidate):
        given = f" (given by --{flag})" if flag else ""
        saved = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        raise checkpoints.CheckpointError(
            f"the folder {path!r}{given} has no {name} (it holds {saved or 'no .safetensors files'}); "
            f"pass a folder written by save_pretrained or a checkpoint file"
        )
    return candidate


def to_adm_layout(state_dict):
    """``state_dict`` with consistency-model attention weights [*, C, 1, 1] squeezed to [*, C, 1]."""
    return {
        key: value[..., 0] if key.endswith(_ATTENTION_WEIGHTS) and value.dim() == 4 and value.shape[-1] == 1
        else value
        for key, value in state_dict.items()
    }


def read_weights(path, *, ema_rate=None, flag=None):
    """The state_dict at ``path`` (file or pretrained folder) in our layout; rank 0 reads, all ranks get it."""
    state_dict = dist_util.load_state_dict(weights_file(path, ema_rate=ema_rate, flag=flag), map_location="cpu")
    return to_adm_layout(state_dict)


def pretrained_flags(folder_or_file, *, preset="", **flag_overrides):
    """(complete flags, preset name) that `from_pretrained` builds its model from.

    Flags, lowest first: the defaults < ``config.json`` (or the config beside the
    file) < ``preset`` (a file without a config: the preset named like the file,
    e.g. ``ct_bedroom256.pt``) < ``flag_overrides``.
    """
    path = os.fspath(folder_or_file)
    config = checkpoints.find_config(path) or {}
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    name = preset or ("" if config or stem not in presets.PRESETS else stem)
    flags = {key: value for key, value in config.items() if key not in (VERSION_KEY, PRESET_KEY)}
    if name:
        if presets.PRESETS.get(name, {}).get("kind") == "classifier":
            raise checkpoints.CheckpointError(
                f"preset {name!r} is a classifier; from_pretrained builds diffusion and super-resolution UNets"
            )
        flags.update(presets.preset_flags(name))
    flags = _all_flags(flags)
    unknown = sorted(set(flag_overrides) - set(flags))
    if unknown:
        raise TypeError(f"unknown flag(s) {', '.join(unknown)}; pass model or diffusion flags")
    flags.update(flag_overrides)
    return flags, name or config.get(PRESET_KEY, "")


def from_pretrained(folder_or_file, *, ema_rate=None, preset="", **flag_overrides):
    """(model, diffusion) from a pretrained folder or a checkpoint file, in eval mode on the CPU.

    The flags are `pretrained_flags`'. Overriding a head flag (``HEAD_FLAGS``) re-heads
    the model (`load_fitting`); otherwise the weights must fit exactly. ``ema_rate``
    loads a folder's ``ema_<rate>.safetensors`` instead of ``model.safetensors``.
    """
    saved, _ = pretrained_flags(folder_or_file, preset=preset)
    flags, name = pretrained_flags(folder_or_file, preset=preset, **flag_overrides)
    reheaded = any(saved[key] != flags[key] for key in HEAD_FLAGS)
    model, diffusion = build(flags)
    state_dict = read_weights(folder_or_file, ema_rate=ema_rate)
    source = os.fspath(folder_or_file) + (f" (preset {name})" if name else "")
    if reheaded:
        load_fitting(model, state_dict, flags=flags, source=source)
    else:
        checkpoints.load_model_weights(model, state_dict, flags=flags, source=source)
    return model.eval(), diffusion


# ---------------------------------------------------------------- re-headed loading


def load_fitting(model, state_dict, *, flags=None, source=""):
    """Load every tensor of ``state_dict`` that fits ``model``; heads that do not fit keep
    ``model``'s fresh initialisation. Returns their names, also logged in one line.

    Only `HEAD_KEYS` may be missing, extra or reshaped; any other mismatch raises the
    ``CheckpointError`` of a strict load (with the flags the weights imply).
    """
    model_state = model.state_dict()
    fresh = sorted(
        key for key in HEAD_KEYS
        if key in model_state and (key not in state_dict or state_dict[key].shape != model_state[key].shape)
    )
    dropped = sorted(key for key in HEAD_KEYS if key in state_dict and key not in model_state)
    kept = {key: value for key, value in state_dict.items() if key not in fresh and key not in dropped}
    rest = {key: value for key, value in model_state.items() if key not in fresh}
    if checkpoints.describe_mismatch(rest, kept):
        # the strict load's message: the heads help it infer the flags the weights imply
        raise checkpoints.CheckpointError(
            checkpoints.describe_mismatch(model_state, state_dict, flags=flags, source=source)
        )
    model.load_state_dict(kept, strict=False)
    where = f" from {source}" if source else ""
    logger.log(
        f"loaded {len(kept)} tensors{where}; re-initialised (new shape): {', '.join(fresh) or 'none'}"
        + (f"; dropped: {', '.join(dropped)}" if dropped else "")
    )
    return fresh


def init_from(model, path, *, flags=None):
    """``--init_from``: load the weights at ``path`` (file or folder) into the freshly built
    ``model`` for fine-tuning, re-heading where the flags changed a head (`load_fitting`)."""
    return load_fitting(model, read_weights(path, flag="init_from"), flags=flags, source=os.fspath(path))
