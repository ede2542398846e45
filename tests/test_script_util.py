"""Specification of script_util beyond the original: any image size, fractional and
overridable channel settings, help on every flag, and flag resolution with presets
and saved configs. (The original's behaviour is pinned by the golden su_* scenarios.)"""

import argparse
import json
import shlex

import pytest
import torch

from guided_diffusion import script_util as su


def _meta(fn, *args, **kwargs):
    with torch.device("meta"):
        return fn(*args, **kwargs)


def _level_widths(model):
    """Output width of the first residual block of each level (input_blocks)."""
    sd = model.state_dict()
    return [v.shape[0] for k, v in sorted(sd.items()) if k.endswith("0.out_layers.3.weight") and k.startswith("input_blocks.")]


# ---------------------------------------------------------------- channel_mult


@pytest.mark.parametrize(
    "size, expected",
    [
        (512, (0.5, 1, 1, 2, 2, 4, 4)),
        (256, (1, 1, 2, 2, 4, 4)),
        (128, (1, 1, 2, 3, 4)),
        (64, (1, 2, 3, 4)),
        (32, (1, 2, 2, 2)),
    ],
)
def test_listed_sizes_get_the_original_channel_mult(size, expected):
    assert su.default_channel_mult(size) == expected


@pytest.mark.parametrize(
    "size, expected",
    [(96, (1, 2, 3, 4)), (48, (1, 2, 2, 2)), (384, (1, 1, 2, 2, 4, 4)), (16, (1, 2, 2)), (8, (1, 2)), (24, (1, 2, 2))],
)
def test_unlisted_sizes_follow_the_documented_rule(size, expected):
    mult = su.default_channel_mult(size)
    assert mult == expected
    assert size % 2 ** (len(mult) - 1) == 0


def test_size_that_cannot_halve_enough_names_a_channel_mult_that_fits():
    with pytest.raises(ValueError, match="--channel_mult") as info:
        su.default_channel_mult(100)
    message = str(info.value)
    assert "100" in message
    suggested = message.rsplit("--channel_mult ", 1)[1]
    levels = len(suggested.split(","))
    assert 100 % 2 ** (levels - 1) == 0


def test_super_res_512_uses_its_own_table():
    assert su.default_channel_mult(512, su._SR_CHANNEL_MULT) == (1, 1, 2, 2, 4, 4)


def test_fractional_channel_mult_parses_and_keeps_whole_numbers_int():
    mult = su.parse_channel_mult("0.5,1,1,2", 64)
    assert mult == (0.5, 1, 1, 2)
    assert [type(m) for m in mult] == [float, int, int, int]


def test_fractional_channel_mult_builds_half_width_level():
    model = _meta(su.create_model, 32, 64, 1, channel_mult="0.5,1,2", attention_resolutions="8")
    assert _level_widths(model) == [32, 64, 128]


@pytest.mark.parametrize("text", ["1,two,3", "1,,2", "0,1,2", "-1,2"])
def test_bad_channel_mult_names_the_flag_and_value(text):
    with pytest.raises(ValueError, match="--channel_mult") as info:
        su.parse_channel_mult(text, 64)
    assert repr(text) in str(info.value)


def test_bad_attention_resolutions_names_the_flag():
    with pytest.raises(ValueError, match="--attention_resolutions.*'16,x'"):
        su.create_model(64, 32, 1, attention_resolutions="16,x")


def test_attention_resolution_the_network_lacks_is_warned_about():
    with pytest.warns(UserWarning, match="--attention_resolutions 16,4.*no level at resolution 4.*32,16"):
        _meta(su.create_model, 32, 32, 1, channel_mult="1,2", attention_resolutions="16,4")


def test_empty_attention_resolutions_builds_a_model_without_attention():
    model = _meta(su.create_model, 32, 32, 1, channel_mult="1,2", attention_resolutions="")
    keys = model.state_dict().keys()
    assert not any(".qkv." in k for k in keys if not k.startswith("middle_block"))


def test_unlisted_image_size_builds_and_runs():
    model = su.create_model(48, 32, 1, channel_mult="", attention_resolutions="12")
    out = model(torch.zeros(1, 3, 48, 48), torch.tensor([3]))
    assert out.shape == (1, 3, 48, 48)


# ---------------------------------------------------------------- in/out channels and classes


def test_grayscale_model_with_learned_sigma_has_two_output_channels():
    model = _meta(su.create_model, 32, 32, 1, learn_sigma=True, in_channels=1)
    sd = model.state_dict()
    assert sd["input_blocks.0.0.weight"].shape[1] == 1
    assert sd["out.2.weight"].shape[0] == 2


def test_explicit_out_channels_is_honoured():
    model = _meta(su.create_model, 32, 32, 1, in_channels=3, out_channels=5)
    assert model.state_dict()["out.2.weight"].shape[0] == 5


def test_custom_num_classes_sizes_the_label_embedding_only_when_class_cond():
    cond = _meta(su.create_model, 32, 32, 1, class_cond=True, num_classes=10)
    uncond = _meta(su.create_model, 32, 32, 1, class_cond=False, num_classes=10)
    assert cond.state_dict()["label_emb.weight"].shape == (10, 128)
    assert "label_emb.weight" not in uncond.state_dict()


def test_classifier_takes_in_channels_num_classes_and_channel_mult():
    clf = _meta(
        su.create_classifier, 32, False, 32, 1, "16", True, True, "attention",
        in_channels=1, num_classes=10, classifier_channel_mult="1,2",
    )
    sd = clf.state_dict()
    assert sd["input_blocks.0.0.weight"].shape[1] == 1
    assert sd["out.2.c_proj.weight"].shape[0] == 10


def test_super_res_grayscale_stacks_image_and_low_res():
    model = _meta(
        su.sr_create_model, 64, 32, 32, 1, True, False, False, "16", 1, -1, -1, True, 0.0, False, False,
        in_channels=1,
    )
    sd = model.state_dict()
    assert sd["input_blocks.0.0.weight"].shape[1] == 2
    assert sd["out.2.weight"].shape[0] == 2


def test_extra_flags_are_accepted_by_the_from_flags_factories():
    flags = su.model_and_diffusion_defaults()
    flags.update(su.model_extra_defaults(), image_size=32, num_channels=32, num_res_blocks=1, in_channels=1)
    model = _meta(lambda: su.create_model_and_diffusion(**flags)[0])
    assert model.state_dict()["input_blocks.0.0.weight"].shape[1] == 1
    cflags = su.classifier_and_diffusion_defaults()
    cflags.update(su.classifier_extra_defaults(), image_size=32, classifier_width=64, classifier_depth=1, num_classes=7)
    clf = _meta(lambda: su.create_classifier_and_diffusion(**cflags)[0])
    assert clf.state_dict()["out.2.c_proj.weight"].shape[0] == 7
    sflags = su.sr_model_and_diffusion_defaults()
    sflags.update(su.sr_extra_defaults(), large_size=128, small_size=32, num_channels=32, num_res_blocks=1)
    sr = _meta(lambda: su.sr_create_model_and_diffusion(**sflags)[0])
    assert len(_level_widths(sr)) == len(su.default_channel_mult(128))


def test_extra_defaults_stay_out_of_the_original_dicts():
    for extra in (su.model_extra_defaults(), su.classifier_extra_defaults(), su.sr_extra_defaults()):
        for original in (su.model_and_diffusion_defaults(), su.classifier_defaults(), su.sr_model_and_diffusion_defaults()):
            assert not (set(extra) - {"channel_mult"}) & set(original)


# ---------------------------------------------------------------- argparse helpers


def test_every_flag_has_help_text():
    parser = argparse.ArgumentParser()
    flags = {}
    for fn in (su.model_and_diffusion_defaults, su.classifier_defaults, su.sr_model_and_diffusion_defaults,
               su.model_extra_defaults, su.classifier_extra_defaults):
        flags.update(fn())
    su.add_dict_to_argparser(parser, flags)
    missing = [a.dest for a in parser._actions if a.option_strings and a.dest != "help" and not a.help]
    assert missing == []


def test_str2bool_error_names_the_value():
    with pytest.raises(argparse.ArgumentTypeError, match="'maybe'"):
        su.str2bool("maybe")


def _parser(**extra):
    parser = argparse.ArgumentParser()
    defaults = su.model_and_diffusion_defaults()
    defaults.update(su.model_extra_defaults(), model_path="", classifier_path="", batch_size=16, **extra)
    su.add_dict_to_argparser(parser, defaults)
    return parser


def test_format_flags_round_trips_through_the_parser():
    args = _parser().parse_args(["--num_channels", "64", "--attention_resolutions", "32,16"])
    again = _parser().parse_args(shlex.split(su.format_flags(args)))
    assert vars(again) == vars(args)


def test_flags_json_holds_the_chosen_keys():
    args = _parser().parse_args(["--num_channels", "64"])
    assert json.loads(su.flags_json(args, ["num_channels", "learn_sigma"])) == {"num_channels": 64, "learn_sigma": False}


# ---------------------------------------------------------------- parse_args_with_presets


def _write_config(folder, flags, name="config.json"):
    (folder / name).write_text(json.dumps(flags))
    path = folder / "model.pt"
    path.write_bytes(b"")
    return str(path)


def test_script_defaults_apply_without_config_or_preset():
    args = su.parse_args_with_presets(_parser(), [])
    assert args.num_channels == 128 and args.preset == ""


def test_saved_config_overrides_script_defaults(tmp_path):
    path = _write_config(tmp_path, {"num_channels": 64, "learn_sigma": True, "lr": 5.0})
    args = su.parse_args_with_presets(_parser(), ["--model_path", path])
    assert (args.num_channels, args.learn_sigma) == (64, True)
    assert not hasattr(args, "lr")  # only flags the parser knows


def test_run_flags_saved_by_training_do_not_leak_into_other_runs(tmp_path):
    path = _write_config(tmp_path, {"num_channels": 64, "batch_size": 128, "model_path": "elsewhere.pt"})
    args = su.parse_args_with_presets(_parser(), ["--model_path", path])
    assert (args.num_channels, args.batch_size, args.model_path) == (64, 16, path)


def test_classifier_config_alone_does_not_set_the_diffusion(tmp_path):
    clf = _write_config(tmp_path, {"classifier_depth": 4, "learn_sigma": False, "diffusion_steps": 7})
    parser = _parser(**su.classifier_defaults())
    argv = ["--learn_sigma", "True", "--classifier_path", clf]
    args = su.parse_args_with_presets(parser, argv, checkpoint_flags=("model_path", "classifier_path"))
    assert (args.classifier_depth, args.learn_sigma, args.diffusion_steps) == (4, True, 1000)


def test_checkpoint_stem_json_wins_over_config_json(tmp_path):
    _write_config(tmp_path, {"num_channels": 64})
    path = _write_config(tmp_path, {"num_channels": 96}, name="model.json")
    assert su.parse_args_with_presets(_parser(), ["--model_path", path]).num_channels == 96


def test_preset_overrides_saved_config_and_explicit_flags_override_both(tmp_path):
    path = _write_config(tmp_path, {"num_channels": 64, "dropout": 0.2, "in_channels": 1})
    argv = ["--model_path", path, "--preset", "cifar10_uncond_50M_500K", "--num_res_blocks", "5"]
    args = su.parse_args_with_presets(_parser(), argv)
    assert args.num_channels == 128  # preset over config
    assert args.dropout == 0.3
    assert args.in_channels == 1  # config, the preset does not set it
    assert args.num_res_blocks == 5  # explicit over preset
    assert args.rescale_timesteps is True  # improved-diffusion's default travels with its preset


def test_earlier_checkpoint_flag_config_wins(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "c").mkdir()
    model = _write_config(tmp_path / "m", {"learn_sigma": True, "image_size": 128})
    clf = _write_config(tmp_path / "c", {"image_size": 64, "classifier_depth": 4}, name="model.json")
    parser = _parser(**su.classifier_defaults())
    args = su.parse_args_with_presets(parser, ["--model_path", model, "--classifier_path", clf],
                                      checkpoint_flags=("model_path", "classifier_path"))
    assert (args.learn_sigma, args.image_size, args.classifier_depth) == (True, 128, 4)


def test_presets_combine_left_to_right():
    parser = _parser(**su.classifier_defaults())
    args = su.parse_args_with_presets(parser, ["--preset", "64x64_diffusion,64x64_classifier"])
    assert (args.num_channels, args.classifier_depth, args.use_new_attention_order) == (192, 4, True)


def test_sample_purpose_adds_the_readme_sampling_flags():
    plain = su.parse_args_with_presets(_parser(), ["--preset", "256x256_diffusion"])
    sample = su.parse_args_with_presets(_parser(), ["--preset", "256x256_diffusion"], purpose="sample")
    assert plain.timestep_respacing == "" and plain.batch_size == 16
    assert sample.timestep_respacing == "250" and sample.batch_size == 4


def test_unknown_preset_exits_listing_the_names(capsys):
    with pytest.raises(SystemExit):
        su.parse_args_with_presets(_parser(), ["--preset", "256x256_difusion"])
    err = capsys.readouterr().err
    assert "256x256_difusion" in err and "256x256_diffusion" in err and "lsun_bedroom" in err


def test_preset_help_lists_the_names(capsys):
    with pytest.raises(SystemExit):
        su.parse_args_with_presets(_parser(), ["--help"])
    assert "cifar10_uncond_50M_500K" in capsys.readouterr().out
