"""Checkpoint I/O: safe reading, atomic writing, saved configs, mismatch diagnosis.

- Reading never runs code: ``.pt``/``.pth`` files are read with
  ``torch.load(weights_only=True)`` and ``.safetensors`` files with the
  ``safetensors`` package.
- Writing is atomic (``atomic_save``, ``atomic_write_text``, from `atomic`): a
  crash leaves the old file or the new one under the final name, never a partial
  file.
- The flags a checkpoint was built with are saved beside it as JSON, so that
  loading it needs no flags (``save_config`` / ``find_config``).
- When weights do not fit a model, ``load_model_weights`` says which keys are
  missing, unexpected or mis-shaped and which flags the weights were built with
  (``infer_model_flags`` reads them off the tensor shapes).
"""

import io
import json
import os
import pickle
import re

import torch

# atomic_save and atomic_write_text are part of this module's documented interface.
from .atomic import atomic_save, atomic_write_text  # noqa: F401


class CheckpointError(RuntimeError):
    """A checkpoint could not be read, or does not fit the model."""

    usage_error = True  # the file or the flags given with it are the user's to fix (errors.run_main)


CONFIG_NAME = "config.json"

_SAFETENSORS_SUFFIX = ".safetensors"
_ZIP_MAGIC = b"PK\x03\x04"


# ---------------------------------------------------------------- reading


def _is_remote(path):
    return "://" in str(path)


def _read_bytes(path):
    if _is_remote(path):
        import blobfile

        with blobfile.BlobFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _looks_like_safetensors(name, data):
    if str(name).endswith(_SAFETENSORS_SUFFIX):
        return True
    if data[:4] == _ZIP_MAGIC or len(data) < 9:
        return False
    # safetensors: 8-byte little-endian header length, then a JSON header.
    header_len = int.from_bytes(data[:8], "little")
    return 0 < header_len < len(data) and data[8:9] == b"{"


def _device_name(map_location):
    if map_location is None:
        return "cpu"
    if isinstance(map_location, (str, torch.device)):
        return str(map_location)
    raise CheckpointError(
        f"safetensors checkpoints need map_location to be a device name or torch.device; "
        f"got {map_location!r}. Load to 'cpu' and move the tensors afterwards."
    )


def _load_safetensors(data, name, map_location):
    try:
        from safetensors.torch import load as load_safetensors
    except ImportError:
        raise CheckpointError(
            f"{name} is a .safetensors file but the safetensors package is not installed; "
            f"install it with `pip install safetensors`"
        ) from None
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # the package raises its own error types
        raise CheckpointError(f"cannot read {name} as safetensors: {exc}") from exc
    device = _device_name(map_location)
    return {key: value.to(device) for key, value in tensors.items()}


def _load_torch(data, name, map_location):
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {name}: it holds Python objects that would run code when "
            f"unpickled, and checkpoints are read with torch.load(weights_only=True). "
            f"Only if you trust its source, open it with torch.load(path, weights_only=False) "
            f"and save its state_dict (torch.save(model.state_dict(), path)) or convert it to "
            f".safetensors. Details: {str(exc).splitlines()[0]}"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"cannot read {name} as a PyTorch checkpoint: {exc}") from exc


def load_checkpoint_bytes(data, name, map_location="cpu"):
    """Decode checkpoint ``data`` (bytes of a ``.pt``/``.pth`` or ``.safetensors`` file).

    ``name`` is the file name: its suffix chooses the format (unknown suffixes
    are sniffed) and it appears in error messages.
    """
    if _looks_like_safetensors(name, data):
        return _load_safetensors(data, name, map_location)
    return _load_torch(data, name, map_location)


def load_checkpoint_file(path, map_location="cpu", *, flag=None):
    """Read a checkpoint file safely (see module docstring) and return its dict.

    ``flag`` (e.g. ``"--model_path"``) names the command-line flag that gave
    ``path``, for the error message when the file does not exist.
    """
    path = os.fspath(path)
    if not _is_remote(path) and not os.path.isfile(path):
        given = f" (given by {flag})" if flag else ""
        hint = "it is a folder, not a file" if os.path.isdir(path) else "no such file"
        raise CheckpointError(
            f"checkpoint {path!r}{given} cannot be read: {hint}. Pass the path of a .pt, .pth "
            f"or .safetensors file{' with ' + flag if flag else ''}."
        )
    return load_checkpoint_bytes(_read_bytes(path), path, map_location)


# ---------------------------------------------------------------- saved configs


def save_config(directory, flags, *, name=CONFIG_NAME):
    """Save ``flags`` as JSON in ``directory`` (``name`` may be ``<checkpoint stem>.json``)."""
    flags = dict(flags)
    for key, value in flags.items():
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise TypeError(
                f"config flag {key!r} has value {value!r} of type {type(value).__name__}; "
                f"saved configs hold command-line flags (bool, int, float, str or None)"
            )
    path = os.path.join(os.fspath(directory), name)
    atomic_write_text(path, json.dumps(flags, indent=2) + "\n")
    return path


def _read_config(path):
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read the saved config {path}: {exc}. Fix or delete the file, "
            f"or pass the model flags explicitly."
        ) from exc
    if not isinstance(config, dict):
        raise CheckpointError(
            f"the saved config {path} should hold a JSON object of flags, found "
            f"{type(config).__name__}. Fix or delete the file."
        )
    return config


def find_config(checkpoint_path):
    """Flags saved beside a checkpoint: ``<stem>.json``, else ``config.json``; ``None`` if neither.

    For a folder (a pretrained folder), its own ``config.json``.
    """
    checkpoint_path = os.fspath(checkpoint_path)
    if _is_remote(checkpoint_path):
        return None
    if os.path.isdir(checkpoint_path):
        inside = os.path.join(checkpoint_path, CONFIG_NAME)
        return _read_config(inside) if os.path.isfile(inside) else None
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    stem = os.path.splitext(os.path.basename(checkpoint_path))[0]
    for candidate in (os.path.join(folder, stem + ".json"), os.path.join(folder, CONFIG_NAME)):
        if candidate != checkpoint_path and os.path.isfile(candidate):
            return _read_config(candidate)
    return None


# ---------------------------------------------------------------- inferring flags from shapes

NOT_INFERABLE = (
    "num_heads, num_head_channels, num_heads_upsample and use_new_attention_order "
    "(they change no tensor shape), dropout, use_fp16, and the diffusion flags"
)


def _blocks(state_dict, prefix):
    """``{block index: set of key suffixes}`` for keys ``prefix.N.rest``."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.(.+)$")
    blocks = {}
    for key in state_dict:
        match = pattern.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(match.group(2))
    return blocks


def _mult_text(widths, base):
    mults = []
    for width in widths:
        mult = width / base
        mults.append(str(int(mult)) if mult.is_integer() else f"{mult:g}")
    return ",".join(mults)


def _output_levels(state_dict, output_blocks):
    """Number of resolution levels and whether upsampling uses residual blocks."""
    ups, resblock_updown = 0, False
    for index, suffixes in output_blocks.items():
        for sub in {int(s.split(".")[0]) for s in suffixes}:
            if sub == 0:
                continue
            key = f"output_blocks.{index}.{sub}"
            if f"{key}.conv.weight" in state_dict:
                ups += 1
            elif f"{key}.in_layers.2.weight" in state_dict:
                ups += 1
                resblock_updown = True
    return ups + 1, resblock_updown


def _resblock_width(state_dict, key):
    weight = state_dict.get(f"{key}.out_layers.3.weight")
    return None if weight is None else int(weight.shape[0])


def _infer_unet(state_dict, flags, image_size):
    output_blocks = _blocks(state_dict, "output_blocks")
    base = flags["num_channels"]
    levels, resblock_updown = _output_levels(state_dict, output_blocks)
    num_res_blocks = len(output_blocks) // levels - 1
    flags["num_res_blocks"] = num_res_blocks
    flags["resblock_updown"] = resblock_updown
    widths, attention_ds = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        widths.append(_resblock_width(state_dict, f"input_blocks.{first}.0"))
        if f"input_blocks.{first}.1.qkv.weight" in state_dict:
            attention_ds.append(2**level)
    if None not in widths:
        flags["channel_mult"] = _mult_text(widths, base)
    _attention_flags(flags, attention_ds, image_size, "attention_resolutions")
    emb = state_dict.get("input_blocks.1.0.emb_layers.1.weight")
    if emb is not None and widths[0] is not None:
        flags["use_scale_shift_norm"] = int(emb.shape[0]) == 2 * widths[0]


def _attention_flags(flags, attention_ds, image_size, name):
    if image_size:
        flags[name] = ",".join(str(image_size // ds) for ds in attention_ds)
    else:
        flags["attention_ds"] = ",".join(str(ds) for ds in attention_ds)


def _is_super_res(in_channels, out_channels):
    """A super-res UNet's input stacks the image and its upsampled low-res copy (2c channels).

    With c outputs (fixed variance) that is unambiguous; with 2c outputs (learned
    variance) it is read as super-res only for grayscale or RGB (c = 1 or 3).
    """
    if out_channels is None or in_channels % 2:
        return False
    image_channels = in_channels // 2
    return out_channels == image_channels or (out_channels == in_channels and image_channels in (1, 3))


def infer_model_flags(state_dict, *, image_size=None):
    """Flags that built ``state_dict``, read off its key names and tensor shapes.

    Returns a dict with ``kind`` ("diffusion", "super-res" or "classifier") and
    the flags that can be inferred; see ``NOT_INFERABLE`` for those that cannot.
    ``image_size`` (if known) turns attention levels into
    ``attention_resolutions``; without it they are reported as the
    downsampling rates ``attention_ds``.
    """
    flags = {}
    time_embed = state_dict.get("time_embed.0.weight")
    first_conv = state_dict.get("input_blocks.0.0.weight")
    if time_embed is None or first_conv is None:
        return flags
    width = int(time_embed.shape[1])
    in_channels = int(first_conv.shape[1])
    if any(key.startswith("output_blocks.") for key in state_dict):
        out_conv = state_dict.get("out.2.weight")
        out_channels = None if out_conv is None else int(out_conv.shape[0])
        super_res = _is_super_res(in_channels, out_channels)
        image_channels = in_channels // 2 if super_res else in_channels
        flags["kind"] = "super-res" if super_res else "diffusion"
        flags["num_channels"] = width
        if out_channels is not None:
            flags["learn_sigma"] = out_channels == 2 * image_channels
        flags["in_channels"] = image_channels
        if "label_emb.weight" in state_dict:
            flags["class_cond"] = True
            flags["num_classes"] = int(state_dict["label_emb.weight"].shape[0])
        else:
            flags["class_cond"] = False
        _infer_unet(state_dict, flags, image_size)
        return flags
    flags["kind"] = "classifier"
    flags["classifier_width"] = width
    flags["in_channels"] = in_channels
    _infer_classifier(state_dict, flags)
    return flags


def _infer_classifier(state_dict, flags):
    # The head layout tells the pool: attention -> out.2 is an AttentionPool2d;
    # adaptive -> out.3 is a 1x1 convolution; spatial -> linear out.0 and out.2;
    # spatial_v2 -> linear out.0, norm out.1, linear out.3.
    head = None
    if "out.2.positional_embedding" in state_dict:
        flags["classifier_pool"], head = "attention", "out.2.c_proj.weight"
        tokens = int(state_dict["out.2.positional_embedding"].shape[1]) - 1
        flags["final_feature_size"] = int(round(tokens**0.5))
    elif "out.3.weight" in state_dict and state_dict["out.3.weight"].ndim == 4:
        flags["classifier_pool"], head = "adaptive", "out.3.weight"
    elif "out.3.weight" in state_dict:
        flags["classifier_pool"], head = "spatial_v2", "out.3.weight"
    elif "out.2.weight" in state_dict:
        flags["classifier_pool"], head = "spatial", "out.2.weight"
    if head is not None:
        flags["num_classes"] = int(state_dict[head].shape[0])
    emb = state_dict.get("input_blocks.1.0.emb_layers.1.weight")
    width = _resblock_width(state_dict, "input_blocks.1.0")
    if emb is not None and width is not None:
        flags["classifier_use_scale_shift_norm"] = int(emb.shape[0]) == 2 * width
    flags["classifier_resblock_updown"] = not any(key.endswith(".op.weight") for key in state_dict)


# ---------------------------------------------------------------- matching weights to a model


def _flag_hints(inferred, flags):
    """``--flag value`` for inferred flags, marking those that differ from ``flags``."""
    parts = []
    for key, value in inferred.items():
        if key in ("kind", "attention_ds", "final_feature_size"):
            continue
        text = f"--{key} {value}"
        if flags and key in flags and str(flags[key]) != str(value):
            text += f" (you gave {flags[key]})"
        parts.append(text)
    return " ".join(parts)


def _listing(title, items, limit=12):
    if not items:
        return ""
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}):\n    {shown}{more}"


_KIND_WORDS = {"diffusion": "diffusion UNet", "super-res": "super-resolution UNet", "classifier": "classifier"}


def describe_mismatch(model_state, state_dict, *, flags=None, source=""):
    """The error text for weights that do not fit a model; ``""`` when they fit."""
    missing = sorted(set(model_state) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(model_state))
    misshaped = sorted(
        f"{key}: checkpoint {list(state_dict[key].shape)}, model {list(model_state[key].shape)}"
        for key in set(model_state) & set(state_dict)
        if tuple(state_dict[key].shape) != tuple(model_state[key].shape)
    )
    if not (missing or unexpected or misshaped):
        return ""
    where = f" {source}" if source else ""
    text = f"the checkpoint{where} does not fit the model built from the flags:"
    text += _listing("missing keys", missing)
    text += _listing("unexpected keys", unexpected)
    text += _listing("mis-shaped keys", misshaped)
    if unexpected and all(key.startswith("module.") for key in state_dict):
        text += "\n  every key starts with 'module.' (a DistributedDataParallel wrapper): strip that prefix."
    image_size = (flags or {}).get("image_size") or (flags or {}).get("large_size")
    inferred = infer_model_flags(state_dict, image_size=image_size)
    if inferred:
        kind = _KIND_WORDS.get(inferred.get("kind"), "model")
        text += f"\n  the checkpoint looks like a {kind} built with: {_flag_hints(inferred, flags)}"
        if "attention_ds" in inferred:
            text += (
                f"\n  (attention at downsampling rates {inferred['attention_ds']}: "
                f"--attention_resolutions is image_size divided by each)"
            )
        text += f"\n  not inferable from the weights: {NOT_INFERABLE}."
    text += "\n  Pass the matching flags, or --preset NAME for a released checkpoint."
    return text


def load_model_weights(model, state_dict, *, flags=None, source=""):
    """Strictly load ``state_dict`` into ``model``; on any mismatch raise a ``CheckpointError``
    that lists missing, unexpected and mis-shaped keys and the flags the weights fit."""
    message = describe_mismatch(model.state_dict(), state_dict, flags=flags, source=source)
    if message:
        raise CheckpointError(message)
    return model.load_state_dict(state_dict, strict=True)
