"""The command-line flags of the models and the diffusion: defaults, help texts, parsing.

The five ``*_defaults()`` dicts are the original's command-line flags, with the
original's keys, values and order (scripts build their parsers from them and
saved configs use the same names). Flags that the original did not have live in
separate ``*_extra_defaults()`` dicts, so that the original dicts stay exact.
Every flag has its help text in `FLAG_HELP`.

This module is a leaf of the package (it imports none of it), so that presets,
the performance flags and every script can use it without pulling in the
networks. `script_util` re-exports all of it under the original's names.
"""

import argparse

NUM_CLASSES = 1000

# ---------------------------------------------------------------- defaults dicts


def diffusion_defaults():
    """Flags of the Gaussian diffusion process (shared by every script)."""
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def classifier_defaults():
    """Flags of the noisy-image classifier used for guidance."""
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",  # image resolutions, not downsampling rates
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
    )


def model_and_diffusion_defaults():
    """Flags of the diffusion UNet followed by the diffusion flags."""
    flags = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
    )
    flags.update(diffusion_defaults())
    return flags


def classifier_and_diffusion_defaults():
    """Classifier flags followed by the diffusion flags (classifier training)."""
    flags = classifier_defaults()
    flags.update(diffusion_defaults())
    return flags


# The UNet flags that the super-resolution factory does not take: its size comes
# from large_size, its channel_mult from its own table, and it has no attention
# order flag.
_NOT_SUPER_RES = ("image_size", "channel_mult", "use_new_attention_order")


def sr_model_and_diffusion_defaults():
    """Flags of the super-resolution UNet and its diffusion."""
    flags = {k: v for k, v in model_and_diffusion_defaults().items() if k not in _NOT_SUPER_RES}
    flags["large_size"] = 256
    flags["small_size"] = 64
    return flags


def model_extra_defaults():
    """Flags beyond the original for the diffusion UNet (and the super-res UNet),
    followed by those of its diffusion (``diffusion_extra_defaults``).

    Their defaults reproduce the original's behaviour: RGB images, output
    channels derived from ``learn_sigma``, ImageNet's 1000 classes.
    """
    flags = dict(
        in_channels=3,
        out_channels=-1,  # -1: in_channels, doubled when learn_sigma
        num_classes=NUM_CLASSES,
    )
    flags.update(diffusion_extra_defaults())
    return flags


def diffusion_extra_defaults():
    """Flags beyond the original for the diffusion: v-prediction, loss weights, schedules.

    Their defaults reproduce the original's diffusion bit for bit.
    """
    return dict(
        predict_v=False,
        loss_weight="none",
        min_snr_gamma=5.0,
        p2_k=1.0,
        p2_gamma=1.0,
        sigma_data=0.5,
        zero_terminal_snr=False,
        schedule_shift=1.0,
    )


def classifier_extra_defaults():
    """Flags beyond the original for the classifier.

    ``in_channels`` and ``num_classes`` share their names with
    ``model_extra_defaults`` on purpose: classifier and diffusion model see the
    same images and the same labels. Merge the dicts before adding them to a
    parser that has both.
    """
    return dict(
        in_channels=3,
        num_classes=NUM_CLASSES,
        classifier_channel_mult="",
    )


def sr_extra_defaults():
    """Flags beyond the original for the super-resolution UNet."""
    flags = model_extra_defaults()
    flags["channel_mult"] = ""
    return flags


FLAG_HELP = {
    "image_size": "side length in pixels of the (square) images",
    "num_channels": "base channel width of the UNet",
    "num_res_blocks": "residual blocks per resolution level",
    "num_heads": "attention heads (ignored when num_head_channels is set)",
    "num_heads_upsample": "attention heads in the decoder; -1 means num_heads",
    "num_head_channels": "channels per attention head; -1 means use num_heads",
    "attention_resolutions": "comma-separated image resolutions that get attention, e.g. 32,16,8",
    "channel_mult": "comma-separated width multipliers per level, e.g. 1,2,3,4 or 0.5,1,1,2; empty: by image_size",
    "dropout": "dropout probability in the residual blocks",
    "class_cond": "condition the model on class labels",
    "use_checkpoint": "gradient checkpointing (less memory, more compute)",
    "use_scale_shift_norm": "timestep embedding scales and shifts the normalised activations (FiLM)",
    "resblock_updown": "down/upsample with residual blocks instead of plain convolutions",
    "use_fp16": "run the model body in float16",
    "use_new_attention_order": "split heads before q/k/v (QKVAttention) instead of after (legacy order)",
    "learn_sigma": "the model also predicts the variance (output channels doubled)",
    "diffusion_steps": "number of steps T of the diffusion process",
    "noise_schedule": "beta schedule: linear or cosine",
    "timestep_respacing": "sample on fewer steps: e.g. 250, 10,15,20 or ddim50; empty: all steps",
    "use_kl": "train with the variational bound (KL) loss",
    "predict_xstart": "the model predicts x_0 instead of the noise",
    "rescale_timesteps": "feed the model timesteps scaled to 0..1000 (improved-diffusion)",
    "rescale_learned_sigmas": "weight the MSE + VB hybrid loss as improved-diffusion does",
    "classifier_use_fp16": "run the classifier body in float16",
    "classifier_width": "base channel width of the classifier",
    "classifier_depth": "residual blocks per resolution level of the classifier",
    "classifier_attention_resolutions": "comma-separated image resolutions with attention in the classifier",
    "classifier_use_scale_shift_norm": "scale-shift norm in the classifier's residual blocks",
    "classifier_resblock_updown": "downsample with residual blocks in the classifier",
    "classifier_pool": "classifier head: adaptive, attention, spatial or spatial_v2",
    "classifier_channel_mult": "comma-separated width multipliers of the classifier; empty: by image_size",
    "large_size": "output side length of the super-resolution model",
    "small_size": "input (low-resolution) side length of the super-resolution model",
    "in_channels": "image channels (3 for RGB, 1 for grayscale)",
    "out_channels": "model output channels; -1: in_channels, doubled when learn_sigma",
    "num_classes": "number of class labels when class_cond is set",
    "preset": "flag set of a released checkpoint (see guided_diffusion.presets)",
    "predict_v": "the model predicts v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022) "
                 "instead of the noise",
    "loss_weight": "weight of the MSE term as a function of log SNR: none, min_snr, p2, edm or snr_plus_one "
                   "(docs/diffusion.md)",
    "min_snr_gamma": "gamma of --loss_weight min_snr: the SNR above which steps stop gaining weight",
    "p2_k": "k of --loss_weight p2: weight 1 / (k + snr)^gamma on the eps loss",
    "p2_gamma": "gamma of --loss_weight p2",
    "sigma_data": "standard deviation of the data for --loss_weight edm",
    "zero_terminal_snr": "rescale the schedule so its last step is pure noise (SNR 0; Lin et al. 2023); "
                         "needs --predict_v or --predict_xstart",
    "schedule_shift": "shift the cosine schedule's log SNR by -2 log(s), e.g. the image size over 64 "
                      "(Hoogeboom et al. 2023); 1: no shift",
    "schedule_sampler": "timestep density in training: uniform, loss-second-moment, lognormal (EDM's) or "
                        "logit-normal over log SNR, importance-weighted so the loss stays unbiased "
                        "(docs/diffusion.md)",
    "class_dropout_prob": "share of class labels replaced by the null label -1 in training, so the model "
                          "also learns the unconditional case for classifier-free guidance (0: the original's "
                          "training)",
    "init_from": "fine-tune from these weights (a checkpoint file or pretrained folder): weights only, fresh "
                 "optimizer, step 0; heads whose shape the flags changed are re-initialised",
    "allow_partial_resume": "resume from an incomplete checkpoint set (an interrupted save) with whatever files "
                            "it has, inexactly as the original did; otherwise such a set is refused",
    "keep_checkpoints": "keep only the newest N complete checkpoint sets in the log dir, deleting older ones once "
                        "a newer set is complete (0: keep all, as the original)",
    "save_on_signal": "comma-separated signals (e.g. TERM,USR1; none: off) on which every rank finishes its "
                      "iteration, a complete checkpoint set is written and the run exits with status 75",
}


# ---------------------------------------------------------------- argparse helpers


def add_dict_to_argparser(parser, default_dict):
    """Add one ``--key`` flag per entry, typed after its default (bools via ``str2bool``)."""
    for key, value in default_dict.items():
        if value is None:
            value_type = str
        elif isinstance(value, bool):
            value_type = str2bool
        else:
            value_type = type(value)
        parser.add_argument(f"--{key}", default=value, type=value_type, help=FLAG_HELP.get(key))


def args_to_dict(args, keys):
    """The values of ``keys`` from an argparse namespace, in the order of ``keys``."""
    return {key: getattr(args, key) for key in keys}


_TRUE = ("yes", "true", "t", "y", "1")
_FALSE = ("no", "false", "f", "n", "0")


def str2bool(v):
    """Parse a command-line boolean (yes/no, true/false, t/f, y/n, 1/0; any case)."""
    if isinstance(v, bool):
        return v
    if v.lower() in _TRUE:
        return True
    if v.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (true/false, yes/no, 1/0); got {v!r}")


def parser_flags(parser):
    """``{dest: action}`` for the parser's optional flags."""
    return {action.dest: action for action in parser._actions if action.option_strings}
