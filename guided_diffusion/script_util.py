"""Model and diffusion factories, their flag parsing, and flag resolution (presets, saved configs).

The flag defaults, their help texts and the argparse helpers live in `flags`; they
are importable from here under the original's names (``model_and_diffusion_defaults``,
``add_dict_to_argparser``, ``str2bool``...).

Default ``channel_mult`` by image size (used when ``--channel_mult`` is empty):

============  =========================  ===========================
image size    UNet / classifier          super-resolution UNet
============  =========================  ===========================
512           0.5,1,1,2,2,4,4            1,1,2,2,4,4
256           1,1,2,2,4,4                1,1,2,2,4,4
128           1,1,2,3,4                  (as UNet)
64            1,2,3,4                    1,2,3,4
32            1,2,2,2 (improved-diff.)   (as UNet)
============  =========================  ===========================

Any other size follows one rule: a size of at least 32 takes the entry of the
largest listed size below it; a smaller size gets ``1,2,2,...`` with one level
per halving down to 4 pixels. The size must divide evenly by ``2**(levels-1)``
(every downsampling must halve exactly); otherwise a ``ValueError`` names a
``--channel_mult`` that fits.
"""

import argparse
import inspect
import json
import shlex
import sys
import warnings

from . import checkpoints, presets
from . import gaussian_diffusion as gd
from .errors import usage
from .flags import (  # noqa: F401 (re-exported: the original's names of script_util)
    FLAG_HELP,
    NUM_CLASSES,
    add_dict_to_argparser,
    args_to_dict,
    classifier_and_diffusion_defaults,
    classifier_defaults,
    classifier_extra_defaults,
    diffusion_defaults,
    diffusion_extra_defaults,
    model_and_diffusion_defaults,
    model_extra_defaults,
    parser_flags,
    sr_extra_defaults,
    sr_model_and_diffusion_defaults,
    str2bool,
)
from .loss_weights import create_loss_weight
from .respace import SpacedDiffusion, space_timesteps
from .unet import EncoderUNetModel, SuperResModel, UNetModel

# ---------------------------------------------------------------- flag parsing


def parse_channel_mult(text, image_size, table=None, flag="--channel_mult"):
    """Level width multipliers from a flag value, or the default for ``image_size``.

    ``text`` is a comma-separated list ("1,2,3,4", "0.5,1,1,2"); whole numbers
    become ints so the UNet computes the same widths as the original. A tuple
    or list is used as given. An empty value picks the default described in
    the module docstring.
    """
    if text not in ("", None):
        if not isinstance(text, str):
            return tuple(text)
        mults = []
        for token in text.split(","):
            try:
                value = float(token)
            except ValueError:
                raise usage(ValueError(
                    f"{flag} must be comma-separated numbers like 1,2,3,4; got {text!r}"
                )) from None
            if value <= 0:
                raise usage(ValueError(f"{flag} multipliers must be positive; got {text!r}"))
            mults.append(int(value) if value.is_integer() else value)
        return tuple(mults)
    return default_channel_mult(image_size, table, flag=flag)


_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}

_SR_CHANNEL_MULT = {**_CHANNEL_MULT, 512: (1, 1, 2, 2, 4, 4)}


def _halvings(size):
    """How many times ``size`` halves exactly."""
    count = 0
    while size % 2 == 0 and size > 1:
        size //= 2
        count += 1
    return count


def default_channel_mult(image_size, table=None, flag="--channel_mult"):
    """The default ``channel_mult`` for ``image_size`` (rule in the module docstring)."""
    table = _CHANNEL_MULT if table is None else table
    if not isinstance(image_size, int) or image_size < 1:
        raise usage(ValueError(f"image size must be a positive integer; got {image_size!r}"))
    if image_size in table:
        return table[image_size]
    listed_below = [size for size in table if size <= image_size]
    if listed_below and image_size >= 32:
        mult = table[max(listed_below)]
    else:
        levels = 1
        size = image_size
        while size % 2 == 0 and size // 2 >= 4:
            size //= 2
            levels += 1
        mult = (1,) + (2,) * (levels - 1)
    if _halvings(image_size) < len(mult) - 1:
        fits = (1,) + (2,) * min(_halvings(image_size), 3)
        raise usage(ValueError(
            f"image size {image_size} has no default channel_mult: the default "
            f"{','.join(map(str, mult))} needs a size divisible by {2 ** (len(mult) - 1)}. "
            f"Pass {flag} explicitly, e.g. {flag} {','.join(map(str, fits))}"
        ))
    return mult


def attention_downsample_rates(attention_resolutions, image_size, flag="--attention_resolutions", levels=None):
    """Turn image resolutions with attention ("32,16,8") into the UNet's downsampling rates.

    With ``levels`` (the length of ``channel_mult``) a resolution that no level
    of the network has gets a warning: like the original, the model is built
    without attention there.
    """
    if isinstance(attention_resolutions, (tuple, list)):
        tokens = [str(r) for r in attention_resolutions]
    else:
        tokens = [t for t in str(attention_resolutions).split(",") if t.strip()]
    rates = []
    for token in tokens:
        try:
            resolution = int(token)
        except ValueError:
            raise usage(ValueError(
                f"{flag} must be comma-separated integers like 32,16,8; got {attention_resolutions!r}"
            )) from None
        if resolution < 1:
            raise usage(ValueError(f"{flag} resolutions must be positive; got {attention_resolutions!r}"))
        rates.append(image_size // resolution)
    if levels is not None:
        existing = {image_size // 2**level for level in range(levels) if image_size % 2**level == 0}
        unused = [t for t in tokens if int(t) not in existing]
        if unused:
            warnings.warn(
                f"{flag} {attention_resolutions}: the network has no level at resolution "
                f"{','.join(unused)} (its levels: {','.join(map(str, sorted(existing, reverse=True)))}), "
                f"so it gets no attention there",
                stacklevel=3,
            )
    return tuple(rates)


def _output_channels(in_channels, out_channels, learn_sigma):
    if out_channels is None or out_channels < 0:
        return in_channels * (2 if learn_sigma else 1)
    return out_channels


# ---------------------------------------------------------------- factories


def _call_with(factory, flags):
    """``factory`` called with those ``flags`` that are its parameters."""
    names = inspect.signature(factory).parameters
    return factory(**{name: value for name, value in flags.items() if name in names})


def _diffusion_from(flags):
    """The diffusion a ``create_*_and_diffusion`` builds beside its network."""
    return _call_with(create_gaussian_diffusion, dict(flags, steps=flags["diffusion_steps"]))


def create_model_and_diffusion(
    image_size, class_cond, learn_sigma, num_channels, num_res_blocks, channel_mult, num_heads,
    num_head_channels, num_heads_upsample, attention_resolutions, dropout, diffusion_steps,
    noise_schedule, timestep_respacing, use_kl, predict_xstart, rescale_timesteps,
    rescale_learned_sigmas, use_checkpoint, use_scale_shift_norm, resblock_updown, use_fp16,
    use_new_attention_order,
    *, in_channels=3, out_channels=-1, num_classes=NUM_CLASSES,
    predict_v=False, loss_weight="none", min_snr_gamma=5.0, p2_k=1.0, p2_gamma=1.0, sigma_data=0.5,
    zero_terminal_snr=False, schedule_shift=1.0,
):
    """Build the diffusion UNet and its (possibly respaced) diffusion from flags."""
    flags = dict(locals())
    return _call_with(create_model, flags), _diffusion_from(flags)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    *,
    in_channels=3,
    out_channels=-1,
    num_classes=NUM_CLASSES,
):
    """Build the diffusion ``UNetModel`` from flags.

    ``in_channels``, ``out_channels`` (-1: derived from ``learn_sigma``) and
    ``num_classes`` (used only with ``class_cond``) go beyond the original; their
    defaults build the original's model.
    """
    flags = dict(locals())
    return _build_unet(UNetModel, flags.pop("image_size"), None, flags)


def create_classifier_and_diffusion(
    image_size, classifier_use_fp16, classifier_width, classifier_depth,
    classifier_attention_resolutions, classifier_use_scale_shift_norm, classifier_resblock_updown,
    classifier_pool, learn_sigma, diffusion_steps, noise_schedule, timestep_respacing, use_kl,
    predict_xstart, rescale_timesteps, rescale_learned_sigmas,
    *, in_channels=3, num_classes=NUM_CLASSES, classifier_channel_mult="",
):
    """Build the noisy-image classifier and the diffusion that noises its inputs."""
    flags = dict(locals())
    return _call_with(create_classifier, flags), _diffusion_from(flags)


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    *,
    in_channels=3,
    num_classes=NUM_CLASSES,
    classifier_channel_mult="",
):
    """Build the noisy-image classifier (``EncoderUNetModel``, 64-channel heads) from flags."""
    mult = parse_channel_mult(classifier_channel_mult, image_size, flag="--classifier_channel_mult")
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=attention_downsample_rates(
            classifier_attention_resolutions, image_size, flag="--classifier_attention_resolutions", levels=len(mult)
        ),
        channel_mult=mult,
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def sr_create_model_and_diffusion(
    large_size, small_size, class_cond, learn_sigma, num_channels, num_res_blocks, num_heads,
    num_head_channels, num_heads_upsample, attention_resolutions, dropout, diffusion_steps,
    noise_schedule, timestep_respacing, use_kl, predict_xstart, rescale_timesteps,
    rescale_learned_sigmas, use_checkpoint, use_scale_shift_norm, resblock_updown, use_fp16,
    *, in_channels=3, out_channels=-1, num_classes=NUM_CLASSES, channel_mult="",
    predict_v=False, loss_weight="none", min_snr_gamma=5.0, p2_k=1.0, p2_gamma=1.0, sigma_data=0.5,
    zero_terminal_snr=False, schedule_shift=1.0,
):
    """Build the super-resolution UNet and its diffusion from flags."""
    flags = dict(locals())
    return _call_with(sr_create_model, flags), _diffusion_from(flags)


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
    *,
    in_channels=3,
    out_channels=-1,
    num_classes=NUM_CLASSES,
    channel_mult="",
):
    """Build the ``SuperResModel`` (output ``large_size``) from flags.

    ``small_size`` is accepted for flag compatibility: the model upsamples any
    low-resolution input to ``large_size``.
    """
    flags = dict(locals())
    del flags["small_size"]  # the architecture does not depend on it
    return _build_unet(SuperResModel, flags.pop("large_size"), _SR_CHANNEL_MULT, flags)


def _build_unet(cls, image_size, mult_table, flags):
    """``cls`` (``UNetModel`` or ``SuperResModel``) from the flags of ``create_model`` /
    ``sr_create_model``: the flags that need translating are translated, the rest pass through."""
    mult = parse_channel_mult(flags.pop("channel_mult"), image_size, table=mult_table)
    in_channels = flags.pop("in_channels")
    out_channels = _output_channels(in_channels, flags.pop("out_channels"), flags.pop("learn_sigma"))
    attention = attention_downsample_rates(flags.pop("attention_resolutions"), image_size, levels=len(mult))
    class_cond, num_classes = flags.pop("class_cond"), flags.pop("num_classes")
    return cls(
        image_size=image_size, in_channels=in_channels, model_channels=flags.pop("num_channels"),
        out_channels=out_channels, attention_resolutions=attention, channel_mult=mult,
        num_classes=num_classes if class_cond else None, **flags,
    )


def betas_from_flags(noise_schedule, steps, *, schedule_shift=1.0, zero_terminal_snr=False):
    """The training chain's betas (float64) for these flags: the named schedule, shifted, and
    rescaled to end at SNR 0 when ``zero_terminal_snr``."""
    betas = gd.get_named_beta_schedule(noise_schedule, steps, shift=schedule_shift)
    return gd.rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
    predict_v=False,
    loss_weight="none",
    min_snr_gamma=5.0,
    p2_k=1.0,
    p2_gamma=1.0,
    sigma_data=0.5,
    zero_terminal_snr=False,
    schedule_shift=1.0,
):
    """Build the diffusion (a ``SpacedDiffusion``, over all steps unless respaced) from flags.

    Loss: KL bound when ``use_kl``, else MSE, rescaled (improved-diffusion's
    hybrid weighting) when ``rescale_learned_sigmas``, its MSE term weighted by
    ``loss_weight`` (``loss_weights.create_loss_weight`` with ``min_snr_gamma``,
    ``p2_k``, ``p2_gamma``, ``sigma_data``). Variance: learned interpolation when
    ``learn_sigma``, else fixed (small or large). Target: x_0 when ``predict_xstart``,
    v when ``predict_v``, else eps. Schedule: ``noise_schedule`` (cosine shifted by
    ``schedule_shift``), rescaled to end at SNR 0 when ``zero_terminal_snr``.
    """
    if predict_v and predict_xstart:
        raise usage(ValueError("--predict_v and --predict_xstart pick two different targets; pass only one."))
    if zero_terminal_snr and not (predict_v or predict_xstart):
        # Only for the flag: the original's short linear chains (beta_T = 1 at 20 steps)
        # also end at SNR 0, and their eps models keep working as they did.
        raise usage(ValueError(
            "a chain that ends at SNR 0 (--zero_terminal_snr) needs a model that predicts v or x_0, "
            "not eps: eps says nothing about x_0 at SNR 0. Add --predict_v True (or --predict_xstart True)."
        ))
    betas = betas_from_flags(noise_schedule, steps, schedule_shift=schedule_shift, zero_terminal_snr=zero_terminal_snr)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    elif sigma_small:
        var_type = gd.ModelVarType.FIXED_SMALL
    else:
        var_type = gd.ModelVarType.FIXED_LARGE
    if predict_xstart:
        mean_type = gd.ModelMeanType.START_X
    elif predict_v:
        mean_type = gd.ModelMeanType.VELOCITY
    else:
        mean_type = gd.ModelMeanType.EPSILON
    weighting = create_loss_weight(
        loss_weight, min_snr_gamma=min_snr_gamma, p2_k=p2_k, p2_gamma=p2_gamma, sigma_data=sigma_data
    )
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps]),
        betas=betas,
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
        loss_weight=weighting,
    )


# ---------------------------------------------------------------- presets and saved configs


def _known(flags, known):
    return {k: v for k, v in flags.items() if k in known}


def _network_flags(config):
    """The flags of a saved config that describe its checkpoint: network and diffusion.

    Run flags (batch size, learning rate, paths) saved with a training run must
    not leak into, say, a sampling run. A classifier's config (it has
    ``classifier_*`` flags) gives only the classifier's flags, so the diffusion
    it was trained with cannot override the diffusion model's.
    """
    if any(key.startswith("classifier_") for key in config):
        keys = {**classifier_defaults(), **classifier_extra_defaults()}
    else:
        keys = {
            **model_and_diffusion_defaults(),
            **sr_model_and_diffusion_defaults(),
            **model_extra_defaults(),
            **sr_extra_defaults(),
        }
    return {k: v for k, v in config.items() if k in keys}


def add_preset_argument(parser):
    """Add ``--preset`` to ``parser`` unless it has it (so ``--help`` lists it too)."""
    if "preset" not in parser_flags(parser):
        parser.add_argument(
            "--preset",
            default="",
            help="flags of a released checkpoint, comma-separated to combine; one of: "
            + ", ".join(presets.PRESETS),
        )


def parse_args_with_presets(parser, argv=None, checkpoint_flags=("model_path",), *, purpose=None):
    """Parse ``argv`` with defaults taken from saved configs and ``--preset``.

    Precedence, lowest first: the script's defaults < the config saved beside
    each checkpoint named by ``checkpoint_flags`` (``checkpoints.find_config``;
    only its network and diffusion flags, see ``_network_flags``; earlier
    names in ``checkpoint_flags`` win where configs disagree) < the
    preset(s) given by ``--preset NAME[,NAME...]`` (later names win) < flags
    given explicitly on the command line. Only flags the parser knows are taken.

    A preset always contributes its model and diffusion flags; ``purpose="sample"``
    or ``purpose="train"`` adds the sampling or training flags of the original
    README command line.
    """
    add_preset_argument(parser)
    known = parser_flags(parser)
    first = parser.parse_args(argv)

    resolved = {}
    for flag in reversed(checkpoint_flags):
        path = getattr(first, flag, "")
        if path:
            config = checkpoints.find_config(path)
            if config:
                resolved.update(_known(_network_flags(config), known))
    for name in [n.strip() for n in (first.preset or "").split(",") if n.strip()]:
        if name not in presets.PRESETS:
            parser.error(
                f"unknown --preset {name!r}; known presets: {', '.join(presets.PRESETS)}"
            )
        resolved.update(_known(presets.preset_flags(name, purpose), known))
    if not resolved:
        return first
    parser.set_defaults(**resolved)
    return parser.parse_args(argv)


def format_flags(args, keys=None):
    """The effective flags as ``--key value`` lines (shell-quoted), ready to log or to paste back."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    keys = list(values) if keys is None else list(keys)
    return "\n".join(f"--{key} {shlex.quote(str(values[key]))}" for key in keys)


def print_flags(args, keys=None, file=None):
    """Print ``format_flags(args, keys)`` (to stdout unless ``file`` is given)."""
    print(format_flags(args, keys), file=file or sys.stdout)


def flags_json(args, keys=None):
    """The effective flags as JSON (the format ``checkpoints.save_config`` writes)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    keys = list(values) if keys is None else list(keys)
    return json.dumps({key: values[key] for key in keys}, indent=2)
