"""Specification of the released-checkpoint presets: complete flag sets, models that
build with the released architecture (checked on the meta device), known sizes."""

import pytest
import torch

from guided_diffusion import checkpoints, presets
from guided_diffusion import script_util as su

KINDS = {
    "diffusion": (su.model_and_diffusion_defaults, lambda f: su.create_model_and_diffusion(**f)[0]),
    "classifier": (su.classifier_defaults, lambda f: su.create_classifier(**f)),
    "super-res": (su.sr_model_and_diffusion_defaults, lambda f: su.sr_create_model_and_diffusion(**f)[0]),
}

GUIDED = {
    "64x64_diffusion", "128x128_diffusion", "256x256_diffusion", "256x256_diffusion_uncond", "512x512_diffusion",
    "64x64_classifier", "128x128_classifier", "256x256_classifier", "512x512_classifier",
    "64_256_upsampler", "128_512_upsampler", "lsun_bedroom", "lsun_cat", "lsun_horse", "lsun_horse_nodropout",
}
IMPROVED = {
    "cifar10_uncond_50M_500K", "cifar10_uncond_vlb_50M_500K", "imagenet64_uncond_100M_1500K",
    "imagenet64_uncond_vlb_100M_1500K", "imagenet64_cond_270M_250K", "upsample_cond_500K",
    "lsun_uncond_100M_1200K_bs128", "lsun_uncond_100M_2400K_bs64",
}
CONSISTENCY = {
    f"{kind}_{data}{suffix}"
    for data in ("imagenet64", "bedroom256", "cat256")
    for kind, suffix in (("cd", "_l2"), ("cd", "_lpips"), ("ct", ""), ("edm", "_ema"))
}

_BUILT = {}


def build(name):
    """The preset's model on the meta device (no memory, no initialisation cost), cached."""
    if name not in _BUILT:
        preset = presets.PRESETS[name]
        with torch.device("meta"):
            _BUILT[name] = KINDS[preset["kind"]][1](preset["flags"])
    return _BUILT[name]


def n_params(name):
    return sum(p.numel() for p in build(name).parameters())


def test_every_released_checkpoint_of_both_readmes_has_a_preset():
    assert set(presets.PRESETS) == GUIDED | IMPROVED | CONSISTENCY


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_preset_names_its_file_kind_and_source(name):
    preset = presets.PRESETS[name]
    assert preset["kind"] in KINDS
    assert preset["checkpoint"] == name + ".pt"
    assert preset["url"].endswith("/" + preset["checkpoint"])
    sources = {"guided-diffusion": GUIDED, "improved-diffusion": IMPROVED, "consistency-models": CONSISTENCY}
    assert name in sources[preset["source"]]
    assert preset["description"]


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_preset_spells_out_every_flag_of_its_factory_with_the_default_types(name):
    preset = presets.PRESETS[name]
    defaults = KINDS[preset["kind"]][0]()
    assert set(preset["flags"]) == set(defaults)
    for key, value in preset["flags"].items():
        assert type(value) is type(defaults[key]), key


@pytest.mark.parametrize("name", sorted(IMPROVED))
def test_improved_presets_keep_the_improved_architecture(name):
    flags = presets.PRESETS[name]["flags"]
    assert flags["num_head_channels"] == -1
    assert flags["resblock_updown"] is False
    assert flags.get("use_new_attention_order", False) is False


@pytest.mark.parametrize("name", ["cifar10_uncond_50M_500K", "imagenet64_uncond_vlb_100M_1500K"])
def test_improved_presets_keep_its_rescaling_defaults(name):
    flags = presets.PRESETS[name]["flags"]
    assert flags["rescale_timesteps"] is True and flags["rescale_learned_sigmas"] is True


def test_improved_readme_overrides_of_rescaling_are_kept():
    flags = presets.PRESETS["imagenet64_cond_270M_250K"]["flags"]
    assert flags["rescale_timesteps"] is False and flags["rescale_learned_sigmas"] is False


def test_the_two_lsun_bedroom_runs_differ_only_in_learning_rate():
    a = presets.PRESETS["lsun_uncond_100M_1200K_bs128"]
    b = presets.PRESETS["lsun_uncond_100M_2400K_bs64"]
    assert a["flags"] == b["flags"]
    assert (a["train_flags"]["lr"], b["train_flags"]["lr"]) == (1e-4, 2e-5)


def test_preset_flags_adds_run_flags_only_for_a_purpose():
    assert "timestep_respacing" in presets.preset_flags("lsun_bedroom")
    assert presets.preset_flags("lsun_bedroom")["timestep_respacing"] == ""
    assert presets.preset_flags("lsun_bedroom", "sample")["timestep_respacing"] == "1000"
    assert presets.preset_flags("cifar10_uncond_vlb_50M_500K", "train")["schedule_sampler"] == "loss-second-moment"
    with pytest.raises(KeyError, match="lsun_bedroom"):
        presets.preset_flags("nope")
    with pytest.raises(ValueError, match="purpose"):
        presets.preset_flags("lsun_bedroom", "eval")


def _inferable(name):
    """The preset's flags as infer_model_flags would report them."""
    preset = presets.PRESETS[name]
    flags = preset["flags"]
    if preset["kind"] == "classifier":
        return {
            "classifier_width": flags["classifier_width"],
            "classifier_pool": flags["classifier_pool"],
            "classifier_use_scale_shift_norm": flags["classifier_use_scale_shift_norm"],
            "classifier_resblock_updown": flags["classifier_resblock_updown"],
            "num_classes": su.NUM_CLASSES,
        }
    size = flags.get("image_size") or flags["large_size"]
    table = su._SR_CHANNEL_MULT if preset["kind"] == "super-res" else None
    mult = su.parse_channel_mult(flags.get("channel_mult", ""), size, table)
    rates = su.attention_downsample_rates(flags["attention_resolutions"], size)
    expected = {
        "kind": preset["kind"],
        "num_channels": flags["num_channels"],
        "num_res_blocks": flags["num_res_blocks"],
        "learn_sigma": flags["learn_sigma"],
        "class_cond": flags["class_cond"],
        "use_scale_shift_norm": flags["use_scale_shift_norm"],
        "resblock_updown": flags["resblock_updown"],
        "channel_mult": ",".join(f"{m:g}" for m in mult),
        "attention_resolutions": ",".join(str(size // r) for r in sorted(rates)),
        "in_channels": 3,
    }
    if flags["class_cond"]:
        expected["num_classes"] = su.NUM_CLASSES
    return expected


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_built_model_has_the_architecture_its_flags_describe(name):
    """Parameter names and shapes are self-consistent with the flags: reading the
    flags back off the built model's state_dict gives the preset's flags."""
    preset = presets.PRESETS[name]
    size = preset["flags"].get("image_size") or preset["flags"].get("large_size")
    inferred = checkpoints.infer_model_flags(build(name).state_dict(), image_size=size)
    expected = _inferable(name)
    assert {k: inferred.get(k) for k in expected} == expected


# Published sizes. 552,814,086 parameters (2.21 GB in float32) is the widely reported
# size of 256x256_diffusion_uncond.pt; the ADM paper's hyperparameter table gives
# 296M / 422M / 554M / 559M for the 64 / 128 / 256 / 512 ImageNet models;
# improved-diffusion's README gives 270M (ImageNet-64 class-conditional) and 280M
# (upsampler), and its file names 50M (CIFAR-10) and 100M (ImageNet-64, LSUN).
ROUNDED_MILLIONS = {
    "64x64_diffusion": 296,
    "128x128_diffusion": 422,
    "256x256_diffusion": 554,
    "512x512_diffusion": 559,
}
NAMED_MILLIONS = {
    "imagenet64_cond_270M_250K": 270,
    "upsample_cond_500K": 280,
    "cifar10_uncond_50M_500K": 50,
    "imagenet64_uncond_100M_1500K": 100,
    "lsun_uncond_100M_1200K_bs128": 100,
}


def test_unconditional_256_model_has_the_released_parameter_count():
    assert n_params("256x256_diffusion_uncond") == 552_814_086


def test_class_conditional_256_adds_exactly_the_label_embedding():
    assert n_params("256x256_diffusion") - n_params("256x256_diffusion_uncond") == 1000 * 4 * 256


@pytest.mark.parametrize("name", sorted(ROUNDED_MILLIONS))
def test_guided_imagenet_models_match_the_paper_sizes(name):
    assert round(n_params(name) / 1e6) == ROUNDED_MILLIONS[name]


@pytest.mark.parametrize("name", sorted(NAMED_MILLIONS))
def test_improved_models_match_their_published_sizes(name):
    assert n_params(name) / 1e6 == pytest.approx(NAMED_MILLIONS[name], rel=0.25)


def test_lsun_models_share_the_unconditional_256_architecture():
    reference = {k: tuple(v.shape) for k, v in build("256x256_diffusion_uncond").state_dict().items()}
    for name in ("lsun_bedroom", "lsun_cat", "lsun_horse", "lsun_horse_nodropout"):
        assert {k: tuple(v.shape) for k, v in build(name).state_dict().items()} == reference
