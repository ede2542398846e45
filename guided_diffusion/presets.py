"""Flag sets of every checkpoint OpenAI released for guided-diffusion and improved-diffusion.

Data only. Each preset is a dict:

- ``kind``: ``"diffusion"``, ``"classifier"`` or ``"super-res"`` (which factory builds it);
- ``source``: ``"guided-diffusion"`` or ``"improved-diffusion"``;
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


PRESETS = {
    # ------------------------------------------------------------ guided-diffusion: ImageNet
    "64x64_diffusion": dict(
        kind="diffusion",
        source="guided-diffusion",
        checkpoint="64x64_diffusion.pt",
        url=_GUIDED_URL + "64x64_diffusion.pt",
        description="ImageNet 64x64 class-conditional ADM (cosine schedule, new attention order)",
        flags=dict(
            _ADM,
            image_size=64,
            class_cond=True,
            dropout=0.1,
            noise_schedule="cosine",
            num_channels=192,
            num_head_channels=64,
            num_res_blocks=3,
            use_new_attention_order=True,
        ),
        sample_flags=dict(_GUIDED_SAMPLE, classifier_scale=1.0),
        train_flags={},
    ),
    "128x128_diffusion": dict(
        kind="diffusion",
        source="guided-diffusion",
        checkpoint="128x128_diffusion.pt",
        url=_GUIDED_URL + "128x128_diffusion.pt",
        description="ImageNet 128x128 class-conditional ADM",
        flags=dict(_ADM, image_size=128, class_cond=True, num_heads=4),
        sample_flags=dict(_GUIDED_SAMPLE, classifier_scale=0.5),
        train_flags={},
    ),
    "256x256_diffusion": dict(
        kind="diffusion",
        source="guided-diffusion",
        checkpoint="256x256_diffusion.pt",
        url=_GUIDED_URL + "256x256_diffusion.pt",
        description="ImageNet 256x256 class-conditional ADM",
        flags=dict(_ADM, image_size=256, class_cond=True, num_head_channels=64),
        sample_flags=dict(_GUIDED_SAMPLE, classifier_scale=1.0),
        train_flags={},
    ),
    "256x256_diffusion_uncond": dict(
        kind="diffusion",
        source="guided-diffusion",
        checkpoint="256x256_diffusion_uncond.pt",
        url=_GUIDED_URL + "256x256_diffusion_uncond.pt",
        description="ImageNet 256x256 unconditional ADM (guided by the 256x256 classifier)",
        flags=dict(_ADM, image_size=256, class_cond=False, num_head_channels=64),
        sample_flags=dict(_GUIDED_SAMPLE, classifier_scale=10.0),
        train_flags={},
    ),
    "512x512_diffusion": dict(
        kind="diffusion",
        source="guided-diffusion",
        checkpoint="512x512_diffusion.pt",
        url=_GUIDED_URL + "512x512_diffusion.pt",
        description="ImageNet 512x512 class-conditional ADM (float32)",
        flags=dict(_ADM, image_size=512, class_cond=True, num_head_channels=64, use_fp16=False),
        sample_flags=dict(_GUIDED_SAMPLE, classifier_scale=4.0),
        train_flags={},
    ),
    # ------------------------------------------------------------ guided-diffusion: classifiers
    "64x64_classifier": dict(
        kind="classifier",
        source="guided-diffusion",
        checkpoint="64x64_classifier.pt",
        url=_GUIDED_URL + "64x64_classifier.pt",
        description="noisy ImageNet 64x64 classifier for guidance (depth 4)",
        flags=_classifier(64, depth=4),
        sample_flags={},
        train_flags={},
    ),
    "128x128_classifier": dict(
        kind="classifier",
        source="guided-diffusion",
        checkpoint="128x128_classifier.pt",
        url=_GUIDED_URL + "128x128_classifier.pt",
        description="noisy ImageNet 128x128 classifier for guidance",
        flags=_classifier(128, depth=2),
        sample_flags={},
        train_flags=dict(
            iterations=300000, anneal_lr=True, batch_size=256, lr=3e-4, save_interval=10000, weight_decay=0.05
        ),
    ),
    "256x256_classifier": dict(
        kind="classifier",
        source="guided-diffusion",
        checkpoint="256x256_classifier.pt",
        url=_GUIDED_URL + "256x256_classifier.pt",
        description="noisy ImageNet 256x256 classifier for guidance",
        flags=_classifier(256, depth=2),
        sample_flags={},
        train_flags={},
    ),
    "512x512_classifier": dict(
        kind="classifier",
        source="guided-diffusion",
        checkpoint="512x512_classifier.pt",
        url=_GUIDED_URL + "512x512_classifier.pt",
        description="noisy ImageNet 512x512 classifier for guidance",
        flags=_classifier(512, depth=2),
        sample_flags={},
        train_flags={},
    ),
    # ------------------------------------------------------------ guided-diffusion: upsamplers
    "64_256_upsampler": dict(
        kind="super-res",
        source="guided-diffusion",
        checkpoint="64_256_upsampler.pt",
        url=_GUIDED_URL + "64_256_upsampler.pt",
        description="ImageNet 64x64 -> 256x256 class-conditional upsampler",
        flags=_super_res(
            _ADM, large_size=256, small_size=64, class_cond=True, num_channels=192, num_heads=4
        ),
        sample_flags=dict(_GUIDED_SAMPLE),
        train_flags={},
    ),
    "128_512_upsampler": dict(
        kind="super-res",
        source="guided-diffusion",
        checkpoint="128_512_upsampler.pt",
        url=_GUIDED_URL + "128_512_upsampler.pt",
        description="ImageNet 128x128 -> 512x512 class-conditional upsampler",
        flags=_super_res(
            _ADM,
            large_size=512,
            small_size=128,
            attention_resolutions="32,16",
            class_cond=True,
            num_channels=192,
            num_head_channels=64,
        ),
        sample_flags=dict(_GUIDED_SAMPLE),
        train_flags={},
    ),
    # ------------------------------------------------------------ guided-diffusion: LSUN
    "lsun_bedroom": dict(
        kind="diffusion",
        source="guided-diffusion",
        checkpoint="lsun_bedroom.pt",
        url=_GUIDED_URL + "lsun_bedroom.pt",
        description="LSUN bedroom 256x256 unconditional ADM",
        flags=dict(_ADM, image_size=256, dropout=0.1, num_head_channels=64),
        sample_flags=dict(_LSUN_SAMPLE),
        train_flags={},
    ),
    "lsun_cat": dict(
        kind="diffusion",
        source="guided-diffusion",
        checkpoint="lsun_cat.pt",
        url=_GUIDED_URL + "lsun_cat.pt",
        description="LSUN cat 256x256 unconditional ADM",
        flags=dict(_ADM, image_size=256, dropout=0.1, num_head_channels=64),
        sample_flags=dict(_LSUN_SAMPLE),
        train_flags={},
    ),
    "lsun_horse": dict(
        kind="diffusion",
        source="guided-diffusion",
        checkpoint="lsun_horse.pt",
        url=_GUIDED_URL + "lsun_horse.pt",
        description="LSUN horse 256x256 unconditional ADM",
        flags=dict(_ADM, image_size=256, dropout=0.1, num_head_channels=64),
        sample_flags=dict(_LSUN_SAMPLE),
        train_flags={},
    ),
    "lsun_horse_nodropout": dict(
        kind="diffusion",
        source="guided-diffusion",
        checkpoint="lsun_horse_nodropout.pt",
        url=_GUIDED_URL + "lsun_horse_nodropout.pt",
        description="LSUN horse 256x256 unconditional ADM trained without dropout",
        flags=dict(_ADM, image_size=256, dropout=0.0, num_head_channels=64),
        sample_flags=dict(_LSUN_SAMPLE),
        train_flags={},
    ),
    # ------------------------------------------------------------ improved-diffusion
    "imagenet64_uncond_100M_1500K": dict(
        kind="diffusion",
        source="improved-diffusion",
        checkpoint="imagenet64_uncond_100M_1500K.pt",
        url=_IMPROVED_URL + "imagenet64_uncond_100M_1500K.pt",
        description="ImageNet-64 unconditional, L_hybrid objective, cosine schedule",
        flags=dict(
            _IMPROVED_DEFAULTS,
            image_size=64,
            num_channels=128,
            num_res_blocks=3,
            learn_sigma=True,
            diffusion_steps=4000,
            noise_schedule="cosine",
        ),
        sample_flags={},
        train_flags=dict(lr=1e-4, batch_size=128),
    ),
    "imagenet64_uncond_vlb_100M_1500K": dict(
        kind="diffusion",
        source="improved-diffusion",
        checkpoint="imagenet64_uncond_vlb_100M_1500K.pt",
        url=_IMPROVED_URL + "imagenet64_uncond_vlb_100M_1500K.pt",
        description="ImageNet-64 unconditional, L_vlb objective, cosine schedule",
        flags=dict(
            _IMPROVED_DEFAULTS,
            image_size=64,
            num_channels=128,
            num_res_blocks=3,
            learn_sigma=True,
            diffusion_steps=4000,
            noise_schedule="cosine",
            use_kl=True,
        ),
        sample_flags={},
        train_flags=dict(lr=1e-4, batch_size=128, schedule_sampler="loss-second-moment"),
    ),
    "cifar10_uncond_50M_500K": dict(
        kind="diffusion",
        source="improved-diffusion",
        checkpoint="cifar10_uncond_50M_500K.pt",
        url=_IMPROVED_URL + "cifar10_uncond_50M_500K.pt",
        description="CIFAR-10 unconditional, L_hybrid objective, cosine schedule",
        flags=dict(
            _IMPROVED_DEFAULTS,
            image_size=32,
            num_channels=128,
            num_res_blocks=3,
            learn_sigma=True,
            dropout=0.3,
            diffusion_steps=4000,
            noise_schedule="cosine",
        ),
        sample_flags={},
        train_flags=dict(lr=1e-4, batch_size=128),
    ),
    "cifar10_uncond_vlb_50M_500K": dict(
        kind="diffusion",
        source="improved-diffusion",
        checkpoint="cifar10_uncond_vlb_50M_500K.pt",
        url=_IMPROVED_URL + "cifar10_uncond_vlb_50M_500K.pt",
        description="CIFAR-10 unconditional, L_vlb objective, cosine schedule",
        flags=dict(
            _IMPROVED_DEFAULTS,
            image_size=32,
            num_channels=128,
            num_res_blocks=3,
            learn_sigma=True,
            dropout=0.3,
            diffusion_steps=4000,
            noise_schedule="cosine",
            use_kl=True,
        ),
        sample_flags={},
        train_flags=dict(lr=1e-4, batch_size=128, schedule_sampler="loss-second-moment"),
    ),
    "imagenet64_cond_270M_250K": dict(
        kind="diffusion",
        source="improved-diffusion",
        checkpoint="imagenet64_cond_270M_250K.pt",
        url=_IMPROVED_URL + "imagenet64_cond_270M_250K.pt",
        description="ImageNet-64 class-conditional (270M parameters)",
        flags=dict(
            _IMPROVED_DEFAULTS,
            image_size=64,
            num_channels=192,
            num_res_blocks=3,
            learn_sigma=True,
            class_cond=True,
            diffusion_steps=4000,
            noise_schedule="cosine",
            rescale_learned_sigmas=False,
            rescale_timesteps=False,
        ),
        sample_flags={},
        train_flags=dict(lr=3e-4, batch_size=2048),
    ),
    "upsample_cond_500K": dict(
        kind="super-res",
        source="improved-diffusion",
        checkpoint="upsample_cond_500K.pt",
        url=_IMPROVED_URL + "upsample_cond_500K.pt",
        description="ImageNet 64 -> 256 class-conditional upsampler (280M parameters)",
        flags=_super_res(
            _IMPROVED_DEFAULTS,
            large_size=256,
            small_size=64,
            num_channels=192,
            num_res_blocks=2,
            learn_sigma=True,
            class_cond=True,
            diffusion_steps=4000,
            noise_schedule="linear",
            rescale_learned_sigmas=False,
            rescale_timesteps=False,
        ),
        sample_flags={},
        train_flags=dict(lr=3e-4, batch_size=256),
    ),
    "lsun_uncond_100M_1200K_bs128": dict(
        kind="diffusion",
        source="improved-diffusion",
        checkpoint="lsun_uncond_100M_1200K_bs128.pt",
        url=_IMPROVED_URL + "lsun_uncond_100M_1200K_bs128.pt",
        description="LSUN bedroom 256x256 unconditional, trained with lr 1e-4",
        flags=dict(
            _IMPROVED_DEFAULTS,
            image_size=256,
            num_channels=128,
            num_res_blocks=2,
            num_heads=1,
            learn_sigma=True,
            use_scale_shift_norm=False,
            attention_resolutions="16",
            diffusion_steps=1000,
            noise_schedule="linear",
            rescale_learned_sigmas=False,
            rescale_timesteps=False,
        ),
        sample_flags={},
        train_flags=dict(lr=1e-4, batch_size=128),
    ),
    "lsun_uncond_100M_2400K_bs64": dict(
        kind="diffusion",
        source="improved-diffusion",
        checkpoint="lsun_uncond_100M_2400K_bs64.pt",
        url=_IMPROVED_URL + "lsun_uncond_100M_2400K_bs64.pt",
        description="LSUN bedroom 256x256 unconditional, fine-tuned with lr 2e-5",
        flags=dict(
            _IMPROVED_DEFAULTS,
            image_size=256,
            num_channels=128,
            num_res_blocks=2,
            num_heads=1,
            learn_sigma=True,
            use_scale_shift_norm=False,
            attention_resolutions="16",
            diffusion_steps=1000,
            noise_schedule="linear",
            rescale_learned_sigmas=False,
            rescale_timesteps=False,
        ),
        sample_flags={},
        train_flags=dict(lr=2e-5, batch_size=128),
    ),
}

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
