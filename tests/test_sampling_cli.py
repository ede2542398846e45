"""Specifications of guided_diffusion.sampling_cli: the shared flags, their checks, the loop choice."""

import argparse
from types import SimpleNamespace

import pytest

from guided_diffusion import sampling_cli
from guided_diffusion.errors import UsageError


@pytest.mark.parametrize("label,classes", [(10, 10), (-2, 10)])
def test_check_class_label_names_the_flag(label, classes):
    with pytest.raises(UsageError, match=f"--class_label {label}"):
        sampling_cli.check_class_label(label, classes)


def test_check_positive_rejects_zero_with_the_flag_and_value():
    with pytest.raises(UsageError, match="--num_samples must be a positive number, got 0"):
        sampling_cli.check_positive("num_samples", 0, 16)


def test_check_respacing_explains_an_impossible_respacing():
    sampling_cli.check_respacing(100, "ddim10")
    with pytest.raises(UsageError, match="--timestep_respacing 'ddim7'.*--diffusion_steps 10"):
        sampling_cli.check_respacing(10, "ddim7")
    with pytest.raises(UsageError, match="--timestep_respacing '20'"):
        sampling_cli.check_respacing(10, "20")


def test_add_sampling_flags_keeps_a_num_classes_flag_the_script_already_has():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_classes", type=int, default=10)
    sampling_cli.add_sampling_flags(parser)
    args = parser.parse_args(["--seed", "3", "--class_label", "7"])
    assert (args.num_classes, args.seed, args.class_label, args.use_plms) == (10, 3, 7, False)


def test_add_sampling_flags_without_class_choice_has_no_label_flags():
    parser = argparse.ArgumentParser()
    sampling_cli.add_sampling_flags(parser, class_choice=False)
    args = parser.parse_args([])
    assert not hasattr(args, "class_label") and not hasattr(args, "num_classes")


class _Loops:
    p_sample_loop, ddim_sample_loop, plms_sample_loop = "ddpm", "ddim", "plms"


@pytest.mark.parametrize(
    "use_ddim,use_plms,loop", [(False, False, "ddpm"), (True, False, "ddim"), (False, True, "plms")]
)
def test_pick_sample_loop_follows_the_flags(use_ddim, use_plms, loop):
    assert sampling_cli.pick_sample_loop(_Loops(), SimpleNamespace(use_ddim=use_ddim, use_plms=use_plms)) == loop


def test_pick_sample_loop_refuses_ddim_with_plms():
    with pytest.raises(UsageError, match="--use_ddim and --use_plms"):
        sampling_cli.pick_sample_loop(_Loops(), SimpleNamespace(use_ddim=True, use_plms=True))
