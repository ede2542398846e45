"""Flag sets of every checkpoint OpenAI released for guided-diffusion and improved-diffusion.

Data only. Each preset is a dict:

- ``kind``: ``"diffusion"``, ``"classifier"`` or ``"super-res"`` (which factory builds it);
- ``source``: ``"guided-diffusion"``, ``"improved-diffusion"`` or ``"consistency-models"``;
- ``checkpoint``: the released file name, ``url``: where it was published;
- ``description``: one line on what the model is;
- ``flags``: every model and diffusion flag of the checkpoint, spelled out in
  full (so a preset never depends on a script's defaults);
- ``sample_flags`` / ``train_flags``: the sampling or training flags used in the
  original README's command line for it.

The flag values come from the two original READMEs. improved-diffusion's
defaults differ from guided-diffusion's: it rescaled timesteps to 0..1000 and
used the rescaled hybrid loss (``rescale_timesteps`` and
``rescale_learned_sigmas`` True unless its README turns them off), and it had
no ``num_head_channels``, ``resblock_updown`` or ``use_new_attention_order``;
those keep the values that build its architecture (-1, False, False: legacy
attention head order, convolution up/downsampling).
"""

from .flags import model_and_diffusion_defaults

_GUIDED_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
_IMPROVED_URL = "https://openaipublic.blob.core.windows.net/diffusion/march-2021/"
_CONSISTENCY_URL = "https://openaipublic.blob.core.windows.net/consistency/"

# guided-diffusion's model_and_diffusion_defaults(): every preset starts from them.
_GUIDED_DEFAULTS = model_and_diffusion_defaults()

# improved-diffusion's model_and_diffusion_defaults(), in our flag names.
_IMPROVED_DEFAULTS = dict(_GUIDED_DEFAULTS, rescale_timesteps=True, rescale_learned_sigmas=True)

# The ADM architecture shared by the guided-diffusion 128-512 models and LSUN models.
_ADM = dict(
    _GUIDED_DEFAULTS,
    attention_resolutions="32,16,8",
    diffusion_steps=1000,
    learn_sigma=True,
    noise_schedule="linear",
    num_channels=256,
    num_res_blocks=2,
    resblock_updown=True,
    use_fp16=True,
    use_scale_shift_norm=True,
)

# improved-diffusion's LSUN bedroom model (two checkpoints: the run and its fine-tuning).
_IMPROVED_LSUN = dict(
    _IMPROVED_DEFAULTS, image_size=256, num_channels=128, num_res_blocks=2, num_heads=1, learn_sigma=True,
    use_scale_shift_norm=False, attention_resolutions="16", diffusion_steps=1000, noise_schedule="linear",
    rescale_learned_sigmas=False, rescale_timesteps=False,
)

_SUPER_RES_ONLY_MISSING = ("image_size", "channel_mult", "use_new_attention_order")

_GUIDED_SAMPLE = dict(batch_size=4, num_samples=100, timestep_respacing="250")
_LSUN_SAMPLE = dict(batch_size=4, num_samples=100, timestep_respacing="1000")


def _classifier(image_size, depth):
    return dict(
        image_size=image_size,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=depth,
        classifier_attention_resolutions="32,16,8",
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
   )


def _super_res(base, **flags):
    merged = {k: v for k, v in base.items() if k not in _SUPER_RES_ONLY_MISSING}
    merged.update(flags)
    return merged


def _release(source, url, name, kind, description, flags, sample_flags=None, train_flags=None):
    """(``name``, preset) for the released file ``name``.pt of ``source``, published under ``url``."""
    return name, dict(
        kind=kind,
        source=source,
        checkpoint=f"{name}.pt",
        url=f"{url}{name}.pt",
        description=description,
        flags=flags,
        sample_flags=sample_flags or {},
        train_flags=train_flags or {},
   )


# openai/consistency_models (Song et al. 2023): ADM UNets without learned variance whose
# attention runs in the new head order (its flash-attention path); scripts/launch.sh gives
# the flags. EDM teachers trained with dropout 0.1, CD/CT students with none.
_CM_IMAGENET64 = dict(
    _GUIDED_DEFAULTS, image_size=64, class_cond=True, num_channels=192, num_head_channels=64, num_res_blocks=3,
    attention_resolutions="32,16,8", resblock_updown=True, use_fp16=True, use_scale_shift_norm=True,
    use_new_attention_order=True, learn_sigma=False,
)
_CM_LSUN256 = dict(
    _GUIDED_DEFAULTS, image_size=256, class_cond=False, num_channels=256, num_head_channels=64, num_res_blocks=2,
    attention_resolutions="32,16,8", resblock_updown=True, use_fp16=True, use_scale_shift_norm=False,
    use_new_attention_order=True, learn_sigma=False,
)
_CM_DATASETS = {"imagenet64": ("ImageNet 64x64 class-conditional", _CM_IMAGENET64),
                "bedroom256": ("LSUN bedroom 256x256", _CM_LSUN256),
                "cat256": ("LSUN cat 256x256", _CM_LSUN256)}
# Two-step sampling from scripts/launch.sh (--ts); the grid has last + 1 points.
_CM_TWO_STEP = {"cd_imagenet64_l2": "0,22,39", "cd_imagenet64_lpips": "0,22,39", "ct_imagenet64": "0,106,200",
                "cd_bedroom256_l2": "0,18,39", "cd_bedroom256_lpips": "0,17,39", "ct_bedroom256": "0,67,150",
                "ct_cat256": "0,62,150"}
_CM_KINDS = {"edm": "EDM teacher (Karras et al. 2022 preconditioning)",
             "cd_l2": "consistency distillation from the EDM teacher, L2 metric",
             "cd_lpips": "consistency distillation from the EDM teacher, LPIPS metric",
             "ct": "consistency training (no teacher), LPIPS metric"}


def _consistency(dataset, kind):
    """The preset of consistency_models' checkpoint ``kind`` (edm, cd_l2, cd_lpips, ct) on ``dataset``."""
    what, flags = _CM_DATASETS[dataset]
    if kind == "edm":
        name = f"edm_{dataset}_ema"
        sample = dict(sampler="heun", steps=40, denoiser="edm")
    else:
        method, _, metric = kind.partition("_")
        name = f"{method}_{dataset}" + (f"_{metric}" if metric else "")
        two_step = _CM_TWO_STEP.get(name)
        sample = dict(sampler="cm_multistep", cm_ts=two_step) if two_step else dict(sampler="cm_onestep")
    flags = dict(flags, dropout=0.1 if kind == "edm" else 0.0)
    return _release("consistency-models", _CONSISTENCY_URL, name, "diffusion", f"{what} {_CM_KINDS[kind]}",
                    flags=flags, sample_flags=dict(sample, batch_size=4, num_samples=100))


def _guided(*args, **kwargs):
    return _release("guided-diffusion", _GUIDED_URL, *args, **kwargs)


def _improved(*args, **kwargs):
    return _release("improved-diffusion", _IMPROVED_URL, *args, **kwargs)


PRESETS = dict([
    # ------------------------------------------------------------ guided-diffusion: ImageNet
    _guided(
        "64x64_diffusion", "diffusion",
        "ImageNet 64x64 class-conditional ADM (cosine schedule, new attention order)",
        flags=dict(_ADM, image_size=64, class_cond=True, dropout=0.1, noise_schedule="cosine",
                   num_channels=192, num_head_channels=64, num_res_blocks=3, use_new_attention_order=True),
        sample_flags=dict(_GUIDED_SAMPLE, classifier_scale=1.0),
    ),
    _guided(
        "128x128_diffusion", "diffusion", "ImageNet 128x128 class-conditional ADM",
        flags=dict(_ADM, image_size=128, class_cond=True, num_heads=4),
        sample_flags=dict(_GUIDED_SAMPLE, classifier_scale=0.5),
    ),
    _guided(
        "256x256_diffusion", "diffusion", "ImageNet 256x256 class-conditional ADM",
        flags=dict(_ADM, image_size=256, class_cond=True, num_head_channels=64),
        sample_flags=dict(_GUIDED_SAMPLE, classifier_scale=1.0),
    ),
    _guided(
        "256x256_diffusion_uncond", "diffusion",
        "ImageNet 256x256 unconditional ADM (guided by the 256x256 classifier)",
        flags=dict(_ADM, image_size=256, class_cond=False, num_head_channels=64),
        sample_flags=dict(_GUIDED_SAMPLE, classifier_scale=10.0),
    ),
    _guided(
        "512x512_diffusion", "diffusion", "ImageNet 512x512 class-conditional ADM (float32)",
        flags=dict(_ADM, image_size=512, class_cond=True, num_head_channels=64, use_fp16=False),
        sample_flags=dict(_GUIDED_SAMPLE, classifier_scale=4.0),
    ),
    # ------------------------------------------------------------ guided-diffusion: classifiers
    _guided(
        "64x64_classifier", "classifier", "noisy ImageNet 64x64 classifier for guidance (depth 4)",
        flags=_classifier(64, depth=4),
    ),
    _guided(
        "128x128_classifier", "classifier", "noisy ImageNet 128x128 classifier for guidance",
        flags=_classifier(128, depth=2),
        train_flags=dict(iterations=300000, anneal_lr=True, batch_size=256, lr=3e-4, save_interval=10000,
                         weight_decay=0.05),
    ),
    _guided(
        "256x256_classifier", "classifier", "noisy ImageNet 256x256 classifier for guidance",
        flags=_classifier(256, depth=2),
    ),
    _guided(
        "512x512_classifier", "classifier", "noisy ImageNet 512x512 classifier for guidance",
        flags=_classifier(512, depth=2),
    ),
    # ------------------------------------------------------------ guided-diffusion: upsamplers
    _guided(
        "64_256_upsampler", "super-res", "ImageNet 64x64 -> 256x256 class-conditional upsampler",
        flags=_super_res(_ADM, large_size=256, small_size=64, class_cond=True, num_channels=192, num_heads=4),
        sample_flags=dict(_GUIDED_SAMPLE),
    ),
    _guided(
        "128_512_upsampler", "super-res", "ImageNet 128x128 -> 512x512 class-conditional upsampler",
        flags=_super_res(_ADM, large_size=512, small_size=128, attention_resolutions="32,16", class_cond=True,
                         num_channels=192, num_head_channels=64),
        sample_flags=dict(_GUIDED_SAMPLE),
    ),
    # ------------------------------------------------------------ guided-diffusion: LSUN
    _guided(
        "lsun_bedroom", "diffusion", "LSUN bedroom 256x256 unconditional ADM",
        flags=dict(_ADM, image_size=256, dropout=0.1, num_head_channels=64),
        sample_flags=dict(_LSUN_SAMPLE),
    ),
    _guided(
        "lsun_cat", "diffusion", "LSUN cat 256x256 unconditional ADM",
        flags=dict(_ADM, image_size=256, dropout=0.1, num_head_channels=64),
        sample_flags=dict(_LSUN_SAMPLE),
    ),
    _guided(
        "lsun_horse", "diffusion", "LSUN horse 256x256 unconditional ADM",
        flags=dict(_ADM, image_size=256, dropout=0.1, num_head_channels=64),
        sample_flags=dict(_LSUN_SAMPLE),
    ),
    _guided(
        "lsun_horse_nodropout", "diffusion", "LSUN horse 256x256 unconditional ADM trained without dropout",
        flags=dict(_ADM, image_size=256, dropout=0.0, num_head_channels=64),
        sample_flags=dict(_LSUN_SAMPLE),
    ),
    # ------------------------------------------------------------ improved-diffusion
    _improved(
        "imagenet64_uncond_100M_1500K", "diffusion",
        "ImageNet-64 unconditional, L_hybrid objective, cosine schedule",
        flags=dict(_IMPROVED_DEFAULTS, image_size=64, num_channels=128, num_res_blocks=3, learn_sigma=True,
                   diffusion_steps=4000, noise_schedule="cosine"),
        train_flags=dict(lr=1e-4, batch_size=128),
    ),
    _improved(
        "imagenet64_uncond_vlb_100M_1500K", "diffusion",
        "ImageNet-64 unconditional, L_vlb objective, cosine schedule",
        flags=dict(_IMPROVED_DEFAULTS, image_size=64, num_channels=128, num_res_blocks=3, learn_sigma=True,
                   diffusion_steps=4000, noise_schedule="cosine", use_kl=True),
        train_flags=dict(lr=1e-4, batch_size=128, schedule_sampler="loss-second-moment"),
    ),
    _improved(
        "cifar10_uncond_50M_500K", "diffusion", "CIFAR-10 unconditional, L_hybrid objective, cosine schedule",
        flags=dict(_IMPROVED_DEFAULTS, image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True,
                   dropout=0.3, diffusion_steps=4000, noise_schedule="cosine"),
        train_flags=dict(lr=1e-4, batch_size=128),
    ),
    _improved(
        "cifar10_uncond_vlb_50M_500K", "diffusion",
        "CIFAR-10 unconditional, L_vlb objective, cosine schedule",
        flags=dict(_IMPROVED_DEFAULTS, image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True,
                   dropout=0.3, diffusion_steps=4000, noise_schedule="cosine", use_kl=True),
        train_flags=dict(lr=1e-4, batch_size=128, schedule_sampler="loss-second-moment"),
    ),
    _improved(
        "imagenet64_cond_270M_250K", "diffusion", "ImageNet-64 class-conditional (270M parameters)",
        flags=dict(_IMPROVED_DEFAULTS, image_size=64, num_channels=192, num_res_blocks=3, learn_sigma=True,
                   class_cond=True, diffusion_steps=4000, noise_schedule="cosine",
                   rescale_learned_sigmas=False, rescale_timesteps=False),
        train_flags=dict(lr=3e-4, batch_size=2048),
    ),
    _improved(
        "upsample_cond_500K", "super-res", "ImageNet 64 -> 256 class-conditional upsampler (280M parameters)",
        flags=_super_res(_IMPROVED_DEFAULTS, large_size=256, small_size=64, num_channels=192,
                         num_res_blocks=2, learn_sigma=True, class_cond=True, diffusion_steps=4000,
                         noise_schedule="linear", rescale_learned_sigmas=False, rescale_timesteps=False),
        train_flags=dict(lr=3e-4, batch_size=256),
    ),
    _improved(
        "lsun_uncond_100M_1200K_bs128", "diffusion",
        "LSUN bedroom 256x256 unconditional, trained with lr 1e-4",
        flags=_IMPROVED_LSUN,
        train_flags=dict(lr=1e-4, batch_size=128),
    ),
    _improved(
        "lsun_uncond_100M_2400K_bs64", "diffusion",
        "LSUN bedroom 256x256 unconditional, fine-tuned with lr 2e-5",
        flags=_IMPROVED_LSUN,
        train_flags=dict(lr=2e-5, batch_size=128),
    ),
    # ------------------------------------------------------------ consistency models
    *(_consistency(dataset, kind) for dataset in _CM_DATASETS for kind in _CM_KINDS),
])

PURPOSES = (None, "sample", "train")


def preset_flags(name, purpose=None):
    """The flags of preset ``name``; ``purpose`` "sample" or "train" adds the README's run flags."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}; got {purpose!r}")
    preset = PRESETS[name]
    flags = dict(preset["flags"])
    if purpose is not None:
        flags.update(preset[f"{purpose}_flags"])
    return flags
