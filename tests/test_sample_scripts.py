"""End-to-end specifications of the sampling scripts on tiny models (CPU, a few seconds each).

Most cases call the scripts' ``main(argv)`` in this process (fast); a few run
them as real subprocesses to check the command line itself, and the slow ones
run them under ``mpiexec -n 2`` and ``torchrun --nproc_per_node 2``.
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import checkpoints, script_util
from guided_diffusion.errors import UsageError

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
BIN = os.path.dirname(sys.executable)
STEPS = ["--timestep_respacing", "4"]

# Tiny UNet on 8x8 images; the training config saved beside each checkpoint supplies these flags.
TINY_UNET = dict(
    image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
    num_heads=1, learn_sigma=True, diffusion_steps=100, noise_schedule="linear",
)


def _perturbed(model, seed):
    """Random init leaves output layers at zero; nudge every weight so samples depend on them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def _save(folder, model, flags):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.pt")
    torch.save(model.state_dict(), path)
    checkpoints.save_config(folder, flags)
    return path


def _unet_checkpoint(folder, seed, **overrides):
    flags = {**script_util.model_and_diffusion_defaults(), **script_util.model_extra_defaults(), **TINY_UNET}
    flags.update(overrides)
    model, _ = script_util.create_model_and_diffusion(**flags)
    return _save(folder, _perturbed(model, seed), flags)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Paths of the tiny checkpoints (each with its config.json beside it)."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {
        "uncond": _unet_checkpoint(root / "uncond", 1),
        "cond": _unet_checkpoint(root / "cond", 2, class_cond=True, num_classes=10),
        "gray": _unet_checkpoint(root / "gray", 3, in_channels=1, learn_sigma=False),
    }
    clf_flags = {
        **script_util.classifier_defaults(), **script_util.classifier_extra_defaults(),
        **script_util.diffusion_defaults(),
        "image_size": 8, "classifier_width": 32, "classifier_depth": 1, "classifier_channel_mult": "1,2",
        "classifier_attention_resolutions": "4", "num_classes": 10,
    }
    classifier = script_util.create_classifier(
        **{k: clf_flags[k] for k in [*script_util.classifier_defaults(), *script_util.classifier_extra_defaults()]}
    )
    paths["classifier"] = _save(root / "clf", _perturbed(classifier, 4), clf_flags)
    sr_flags = {**script_util.sr_model_and_diffusion_defaults(), **script_util.sr_extra_defaults()}
    sr_flags.update({k: v for k, v in TINY_UNET.items() if k in sr_flags})
    sr_flags.update(large_size=16, small_size=8, attention_resolutions="8")
    sr_model, _ = script_util.sr_create_model_and_diffusion(**sr_flags)
    paths["sr"] = _save(root / "sr", _perturbed(sr_model, 5), sr_flags)
    return paths


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts():
    return {name: _script(name) for name in ("image_sample", "classifier_sample", "super_res_sample")}


def _load(path):
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, OPENAI_LOG_FORMAT="log")
    env.pop("OPENAI_LOGDIR", None)
    return env


# ------------------------------------------------------------------ image_sample


def test_image_sample_cli_writes_the_documented_files(ckpt, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "image_sample.py"), "--model_path", ckpt["uncond"],
         "--num_samples", "3", "--batch_size", "2", *STEPS, "--seed", "0", "--log_dir", str(out)],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert result.returncode == 0, result.stderr
    npz_path = os.path.abspath(out / "samples_3x8x8x3.npz")
    assert result.stdout.strip().splitlines()[-1] == npz_path
    arrays = _load(npz_path)
    assert list(arrays) == ["arr_0"]
    images = arrays["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (3, 8, 8, 3)
    assert images.std() > 0  # a real image, not a constant
    assert Image.open(out / "samples_3x8x8x3.png").size == (16, 16)


def test_image_sample_same_seed_same_images_other_seed_other_images(ckpt, scripts, tmp_path):
    run = scripts["image_sample"].main
    common = ["--model_path", ckpt["uncond"], "--num_samples", "3", "--batch_size", "2", *STEPS]
    first = _load(run([*common, "--seed", "7", "--log_dir", str(tmp_path / "a")]))["arr_0"]
    again = _load(run([*common, "--seed", "7", "--log_dir", str(tmp_path / "b")]))["arr_0"]
    other = _load(run([*common, "--seed", "8", "--log_dir", str(tmp_path / "c")]))["arr_0"]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_image_sample_batch_k_does_not_depend_on_num_samples(ckpt, scripts, tmp_path):
    run = scripts["image_sample"].main
    common = ["--model_path", ckpt["uncond"], "--batch_size", "2", *STEPS, "--seed", "3"]
    two = _load(run([*common, "--num_samples", "2", "--log_dir", str(tmp_path / "a")]))["arr_0"]
    four = _load(run([*common, "--num_samples", "4", "--log_dir", str(tmp_path / "b")]))["arr_0"]
    np.testing.assert_array_equal(four[:2], two)


def test_image_sample_class_conditional_labels(ckpt, scripts, tmp_path):
    run = scripts["image_sample"].main
    common = ["--model_path", ckpt["cond"], "--num_samples", "6", "--batch_size", "3", *STEPS, "--seed", "1"]
    arrays = _load(run([*common, "--log_dir", str(tmp_path / "random")]))
    assert sorted(arrays) == ["arr_0", "arr_1"]
    labels = arrays["arr_1"]
    assert labels.shape == (6,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < 10 and len(set(labels.tolist())) > 1
    fixed = _load(run([*common, "--class_label", "4", "--log_dir", str(tmp_path / "fixed")]))
    assert fixed["arr_1"].tolist() == [4] * 6
    assert not np.array_equal(fixed["arr_0"], arrays["arr_0"])  # the label reaches the model


def test_image_sample_save_png_and_grayscale(ckpt, scripts, tmp_path):
    path = scripts["image_sample"].main(
        ["--model_path", ckpt["gray"], "--num_samples", "3", "--batch_size", "3", *STEPS, "--seed", "0",
         "--save_png", "--log_dir", str(tmp_path)]
    )
    assert os.path.basename(path) == "samples_3x8x8x1.npz"
    images = _load(path)["arr_0"]
    pngs = sorted(os.listdir(tmp_path / "samples"))
    assert pngs == ["000000.png", "000001.png", "000002.png"]
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "samples" / pngs[1])), images[1, :, :, 0])


def test_image_sample_ddim_with_step_progress_bar(ckpt, scripts, tmp_path, capsys):
    path = scripts["image_sample"].main(
        ["--model_path", ckpt["uncond"], "--num_samples", "2", "--batch_size", "2", "--use_ddim", "True",
         "--timestep_respacing", "ddim4", "--seed", "0", "--progress", "--log_dir", str(tmp_path)]
    )
    assert _load(path)["arr_0"].shape == (2, 8, 8, 3)
    assert "4/4" in capsys.readouterr().err  # tqdm over the 4 DDIM steps


# ------------------------------------------------------------------ classifier_sample


def _classifier_argv(ckpt, out, *extra):
    return ["--model_path", ckpt["cond"], "--classifier_path", ckpt["classifier"], "--num_samples", "4",
            "--batch_size", "2", *STEPS, "--seed", "5", "--log_dir", str(out), *extra]


def test_classifier_scale_zero_equals_unguided_sampling(ckpt, scripts, tmp_path):
    guided = _load(scripts["classifier_sample"].main(
        _classifier_argv(ckpt, tmp_path / "g", "--classifier_scale", "0")))
    plain = _load(scripts["image_sample"].main(
        ["--model_path", ckpt["cond"], "--num_samples", "4", "--batch_size", "2", *STEPS, "--seed", "5",
         "--log_dir", str(tmp_path / "p")]))
    np.testing.assert_array_equal(guided["arr_1"], plain["arr_1"])
    np.testing.assert_array_equal(guided["arr_0"], plain["arr_0"])


def test_classifier_guidance_changes_the_samples(ckpt, scripts, tmp_path):
    zero = _load(scripts["classifier_sample"].main(_classifier_argv(ckpt, tmp_path / "a", "--classifier_scale", "0")))
    strong = _load(scripts["classifier_sample"].main(
        _classifier_argv(ckpt, tmp_path / "b", "--classifier_scale", "50")))
    assert strong["arr_0"].shape == (4, 8, 8, 3) and strong["arr_1"].shape == (4,)
    np.testing.assert_array_equal(zero["arr_1"], strong["arr_1"])
    assert not np.array_equal(zero["arr_0"], strong["arr_0"])


def test_classifier_sample_ddim_scale_zero_is_close_to_unguided(ckpt, scripts, tmp_path):
    ddim = ["--use_ddim", "True", "--timestep_respacing", "ddim4"]
    argv = _classifier_argv(ckpt, tmp_path / "g", "--classifier_scale", "0", *ddim)
    argv[argv.index(STEPS[0]) : argv.index(STEPS[0]) + 2] = []
    guided = _load(scripts["classifier_sample"].main(argv))["arr_0"].astype(int)
    plain = _load(scripts["image_sample"].main(
        ["--model_path", ckpt["cond"], "--num_samples", "4", "--batch_size", "2", *ddim, "--seed", "5",
         "--log_dir", str(tmp_path / "p")]))["arr_0"].astype(int)
    # DDIM's guidance goes through eps -> x0 -> eps, exact only up to float rounding
    assert np.abs(guided - plain).max() <= 1


def test_classifier_sample_fixed_class(ckpt, scripts, tmp_path):
    arrays = _load(scripts["classifier_sample"].main(_classifier_argv(ckpt, tmp_path, "--class_label", "9")))
    assert arrays["arr_1"].tolist() == [9] * 4


# ------------------------------------------------------------------ super_res_sample


def test_super_res_from_npz_upsamples_each_base_image(ckpt, scripts, tmp_path):
    base = np.random.RandomState(0).randint(0, 256, size=(3, 8, 8, 3)).astype(np.uint8)
    base_path = tmp_path / "base.npz"
    np.savez(base_path, base)
    path = scripts["super_res_sample"].main(
        ["--model_path", ckpt["sr"], "--base_samples", str(base_path), "--num_samples", "4", "--batch_size", "2",
         *STEPS, "--seed", "0", "--log_dir", str(tmp_path / "out")]
    )
    arrays = _load(path)
    assert os.path.basename(path) == "samples_4x16x16x3.npz" and list(arrays) == ["arr_0"]
    assert arrays["arr_0"].dtype == np.uint8


def test_super_res_from_an_image_folder(ckpt, scripts, tmp_path):
    folder = tmp_path / "low"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.random.RandomState(i).randint(0, 256, (12, 12, 3)).astype(np.uint8)).save(
            folder / f"img_{i}.png")
    path = scripts["super_res_sample"].main(
        ["--model_path", ckpt["sr"], "--base_samples", str(folder), "--num_samples", "2", "--batch_size", "2",
         *STEPS, "--seed", "0", "--log_dir", str(tmp_path / "out")]
    )
    assert _load(path)["arr_0"].shape == (2, 16, 16, 3)


def test_super_res_rejects_base_samples_of_the_wrong_size(ckpt, scripts, tmp_path):
    base_path = tmp_path / "base.npz"
    np.savez(base_path, np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(UsageError, match=r"shape \(2, 16, 16, 3\), expected N x 8 x 8 x 3"):
        scripts["super_res_sample"].main(
            ["--model_path", ckpt["sr"], "--base_samples", str(base_path), "--num_samples", "2", *STEPS,
             "--log_dir", str(tmp_path / "out")]
        )


# ------------------------------------------------------------------ --sampler (guided_diffusion.solvers)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "euler_a"])
def test_image_sample_with_a_solver_is_reproducible_and_differs_from_ddpm(ckpt, scripts, tmp_path, sampler):
    run = scripts["image_sample"].main
    common = ["--model_path", ckpt["cond"], "--num_samples", "3", "--batch_size", "2", "--seed", "3"]
    solved = [*common, "--sampler", sampler, "--steps", "4"]
    first = _load(run([*solved, "--log_dir", str(tmp_path / "a")]))
    again = _load(run([*solved, "--log_dir", str(tmp_path / "b")]))
    ddpm = _load(run([*common, *STEPS, "--log_dir", str(tmp_path / "c")]))
    assert first["arr_0"].shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(first["arr_0"], again["arr_0"])
    np.testing.assert_array_equal(first["arr_1"], ddpm["arr_1"])
    assert not np.array_equal(first["arr_0"], ddpm["arr_0"])


def test_classifier_sample_with_a_solver_at_scale_zero_equals_unguided(ckpt, scripts, tmp_path):
    solver = ["--sampler", "unipc", "--steps", "5", "--spacing", "logsnr"]
    argv = _classifier_argv(ckpt, tmp_path / "g", "--classifier_scale", "0", *solver)
    argv[argv.index(STEPS[0]) : argv.index(STEPS[0]) + 2] = []
    guided = _load(scripts["classifier_sample"].main(argv))
    plain = _load(scripts["image_sample"].main(
        ["--model_path", ckpt["cond"], "--num_samples", "4", "--batch_size", "2", *solver, "--seed", "5",
         "--log_dir", str(tmp_path / "p")]))
    np.testing.assert_array_equal(guided["arr_0"], plain["arr_0"])
    strong = _load(scripts["classifier_sample"].main(
        [*argv[:-2], "--classifier_scale", "50", "--log_dir", str(tmp_path / "s")]))
    assert not np.array_equal(strong["arr_0"], plain["arr_0"])


def test_super_res_sample_with_a_solver(ckpt, scripts, tmp_path):
    base_path = tmp_path / "base.npz"
    np.savez(base_path, np.random.RandomState(1).randint(0, 256, size=(2, 8, 8, 3)).astype(np.uint8))
    path = scripts["super_res_sample"].main(
        ["--model_path", ckpt["sr"], "--base_samples", str(base_path), "--num_samples", "2", "--batch_size", "2",
         "--sampler", "dpmpp_3m", "--steps", "4", "--seed", "0", "--log_dir", str(tmp_path / "out")]
    )
    assert _load(path)["arr_0"].shape == (2, 16, 16, 3)


@pytest.mark.parametrize("extra,message", [
    (["--sampler", "ddim", "--use_ddim", "True"], "--sampler ddim replaces the original's loops"),
    (["--sampler", "ddim", "--steps", "0"], "--steps must be a positive number, got 0"),
    (["--sampler", "ddim", "--steps", "101"], "steps must be an integer from 1 to 100"),
])
def test_solver_flags_that_cannot_work_are_refused(ckpt, scripts, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        scripts["image_sample"].main(
            ["--model_path", ckpt["uncond"], "--num_samples", "1", *extra, "--log_dir", str(tmp_path)]
        )


# ------------------------------------------------------------------ classifier-free guidance


@pytest.mark.parametrize("loop", [STEPS, ["--use_ddim", "True", "--timestep_respacing", "ddim4"],
                                  ["--sampler", "unipc", "--steps", "4"]], ids=["ddpm", "ddim", "unipc"])
def test_cfg_scale_zero_is_bit_identical_to_no_guidance(ckpt, scripts, tmp_path, loop):
    common = ["--model_path", ckpt["cond"], "--num_samples", "3", "--batch_size", "2", *loop, "--seed", "4"]
    plain = _load(scripts["image_sample"].main([*common, "--log_dir", str(tmp_path / "a")]))
    zero = _load(scripts["image_sample"].main([*common, "--cfg_scale", "0", "--log_dir", str(tmp_path / "b")]))
    np.testing.assert_array_equal(zero["arr_0"], plain["arr_0"])


def test_cfg_guides_and_an_interval_outside_the_chain_leaves_the_samples_alone(ckpt, scripts, tmp_path):
    common = ["--model_path", ckpt["cond"], "--num_samples", "3", "--batch_size", "2", *STEPS, "--seed", "4"]
    plain = _load(scripts["image_sample"].main([*common, "--log_dir", str(tmp_path / "a")]))
    guided = _load(scripts["image_sample"].main([*common, "--cfg_scale", "3", "--log_dir", str(tmp_path / "b")]))
    never = _load(scripts["image_sample"].main(
        [*common, "--cfg_scale", "3", "--cfg_interval", "500,600", "--log_dir", str(tmp_path / "c")]))
    assert not np.array_equal(guided["arr_0"], plain["arr_0"])
    np.testing.assert_array_equal(never["arr_0"], plain["arr_0"])
    assert '"cfg_scale": 3.0' in (tmp_path / "b" / "log.txt").read_text()  # the flags are in the run's log


def test_cfg_with_a_guide_model_and_classifier_guidance_in_one_run(ckpt, scripts, tmp_path):
    argv = _classifier_argv(ckpt, tmp_path / "g", "--classifier_scale", "2", "--cfg_scale", "1.5",
                            "--guide_model_path", ckpt["uncond"])
    both = _load(scripts["classifier_sample"].main(argv))
    only = _load(scripts["classifier_sample"].main(
        _classifier_argv(ckpt, tmp_path / "c", "--classifier_scale", "2")))
    assert both["arr_0"].shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(both["arr_1"], only["arr_1"])
    assert not np.array_equal(both["arr_0"], only["arr_0"])


def test_super_res_with_cfg(ckpt, scripts, tmp_path):
    base_path = tmp_path / "base.npz"
    np.savez(base_path, np.random.RandomState(2).randint(0, 256, size=(2, 8, 8, 3)).astype(np.uint8))
    argv = ["--model_path", ckpt["sr"], "--base_samples", str(base_path), "--num_samples", "2", "--batch_size", "2",
            *STEPS, "--seed", "0", "--cfg_scale", "1", "--guide_model_path", ckpt["sr"]]
    path = scripts["super_res_sample"].main([*argv, "--log_dir", str(tmp_path / "out")])
    assert _load(path)["arr_0"].shape == (2, 16, 16, 3)


@pytest.mark.parametrize("extra,message", [
    (["--cfg_scale", "2"], "--cfg_scale with an unconditional model needs a guide"),
    (["--cfg_scale", "2", "--cfg_interval", "7"], "--cfg_interval '7': give two timesteps LO,HI"),
])
def test_cfg_flags_that_cannot_work_are_refused(ckpt, scripts, tmp_path, extra, message):
    model = ckpt["cond"] if "--cfg_interval" in extra else ckpt["uncond"]
    with pytest.raises(UsageError, match=message):
        scripts["image_sample"].main(["--model_path", model, "--num_samples", "1", *STEPS, *extra,
                                      "--log_dir", str(tmp_path)])


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--num_samples", "0"], "--num_samples must be a positive number, got 0"),
        (["--batch_size", "-2"], "--batch_size must be a positive number, got -2"),
        (["--timestep_respacing", "200"], "--timestep_respacing '200' cannot be met"),
    ],
)
def test_image_sample_bad_flags(ckpt, scripts, tmp_path, extra, message):
    with pytest.raises(UsageError, match=message):
        scripts["image_sample"].main(
            ["--model_path", ckpt["uncond"], "--num_samples", "1", *STEPS, *extra, "--log_dir", str(tmp_path)]
        )


def test_image_sample_missing_checkpoint_names_the_flag(scripts, tmp_path):
    with pytest.raises(UsageError, match="--model_path .*nope.pt.*no such file"):
        scripts["image_sample"].main(
            ["--model_path", str(tmp_path / "nope.pt"), "--num_samples", "1", "--log_dir", str(tmp_path)]
        )


def test_image_sample_checkpoint_that_does_not_fit_the_flags(ckpt, scripts, tmp_path):
    lonely = tmp_path / "lonely.pt"  # no config beside it: the flags come from the command line
    shutil.copy(ckpt["uncond"], lonely)
    flags = ["--image_size", "8", "--num_channels", "64", "--channel_mult", "1,2", "--attention_resolutions", "4",
             "--learn_sigma", "True"]
    with pytest.raises(checkpoints.CheckpointError, match=r"--num_channels 32 \(you gave 64\)"):
        scripts["image_sample"].main(
            ["--model_path", str(lonely), *flags, "--num_samples", "1", *STEPS, "--log_dir", str(tmp_path)]
        )


def test_cli_prints_usage_errors_as_one_line_and_exits_2(ckpt, tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "image_sample.py"), "--model_path", ckpt["uncond"],
         "--num_samples", "0", "--log_dir", str(tmp_path)],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert result.returncode == 2
    assert "image_sample.py: error: --num_samples must be a positive number, got 0" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ several processes


def _two_process_run(launcher, ckpt, out, steps=STEPS):
    script = os.path.join(SCRIPTS, "image_sample.py")
    argv = ["--model_path", ckpt["cond"], "--num_samples", "5", "--batch_size", "2", *steps, "--seed", "11",
            "--log_dir", str(out)]
    if launcher == "mpiexec":
        command = [os.path.join(BIN, "mpiexec"), "-n", "2", sys.executable, script, *argv]
    else:
        command = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2", script, *argv]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_two_processes_give_the_same_complete_set_as_one(ckpt, scripts, tmp_path, launcher):
    if launcher == "mpiexec" and not os.path.exists(os.path.join(BIN, "mpiexec")):
        pytest.skip("mpiexec is not installed beside this python")
    one = _load(scripts["image_sample"].main(
        ["--model_path", ckpt["cond"], "--num_samples", "5", "--batch_size", "2", *STEPS, "--seed", "11",
         "--log_dir", str(tmp_path / "one")]))
    result = _two_process_run(launcher, ckpt, tmp_path / "two")
    files = sorted(f for f in os.listdir(tmp_path / "two") if f.endswith(".npz"))
    assert files == ["samples_5x8x8x3.npz"]
    assert str(tmp_path / "two" / files[0]) in result.stdout
    two = _load(tmp_path / "two" / files[0])
    np.testing.assert_array_equal(two["arr_1"], one["arr_1"])
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])


@pytest.mark.slow
def test_a_solver_under_mpiexec_gives_the_same_set_as_one_process(ckpt, scripts, tmp_path):
    if not os.path.exists(os.path.join(BIN, "mpiexec")):
        pytest.skip("mpiexec is not installed beside this python")
    solver = ["--sampler", "dpmpp_2m_sde", "--steps", "4"]
    one = _load(scripts["image_sample"].main(
        ["--model_path", ckpt["cond"], "--num_samples", "5", "--batch_size", "2", *solver, "--seed", "11",
         "--log_dir", str(tmp_path / "one")]))
    _two_process_run("mpiexec", ckpt, tmp_path / "two", steps=solver)
    two = _load(tmp_path / "two" / "samples_5x8x8x3.npz")
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])


# ------------------------------------------------------------------ presets


def test_preset_gives_the_released_model_and_readme_sampling_flags(scripts):
    args = scripts["image_sample"].parse_args(["--preset", "64x64_diffusion", "--num_samples", "8"])
    assert (args.num_channels, args.num_res_blocks, args.noise_schedule, args.class_cond) == (192, 3, "cosine", True)
    assert (args.timestep_respacing, args.batch_size) == ("250", 4)
    assert args.num_samples == 8  # the command line wins over the preset


def test_classifier_preset_combines_with_the_diffusion_preset(scripts):
    args = scripts["classifier_sample"].parse_args(["--preset", "128x128_diffusion,128x128_classifier"])
    assert (args.image_size, args.classifier_scale, args.classifier_depth) == (128, 0.5, 2)
    assert args.num_channels == 256 and args.classifier_pool == "attention"


def test_flags_come_from_the_config_beside_the_checkpoint(ckpt, scripts):
    args = scripts["image_sample"].parse_args(["--model_path", ckpt["cond"]])
    assert (args.image_size, args.num_channels, args.class_cond, args.num_classes) == (8, 32, True, 10)


# ------------------------------------------------------------------ a model trained by image_train.py


def test_sample_from_a_model_trained_for_a_few_steps(scripts, tmp_path):
    """image_train.py saves config.json beside its checkpoints: --model_path alone is enough to sample."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.fromarray(np.random.RandomState(i).randint(0, 256, (8, 8, 3)).astype(np.uint8)).save(
            data / f"c{i % 2}_{i}.png")
    train = _script("image_train").main
    flags = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
             "--attention_resolutions", "4", "--learn_sigma", "True", "--class_cond", "True", "--num_classes", "2",
             "--diffusion_steps", "100"]
    train(["--data_dir", str(data), *flags, "--batch_size", "2", "--max_steps", "3", "--save_interval", "3",
           "--log_dir", str(tmp_path / "run")])
    emas = sorted(f for f in os.listdir(tmp_path / "run") if f.startswith("ema_") and f.endswith(".pt"))
    assert emas, os.listdir(tmp_path / "run")
    path = scripts["image_sample"].main(
        ["--model_path", str(tmp_path / "run" / emas[-1]), "--num_samples", "3", "--batch_size", "2", *STEPS,
         "--seed", "0", "--log_dir", str(tmp_path / "out")])
    arrays = _load(path)
    assert arrays["arr_0"].shape == (3, 8, 8, 3) and set(arrays["arr_1"].tolist()) <= {0, 1}


def test_image_sample_plms_gives_images_from_few_steps(ckpt, scripts, tmp_path):
    argv = ["--model_path", ckpt["uncond"], "--num_samples", "2", "--batch_size", "2",
            "--timestep_respacing", "4", "--seed", "0"]
    plms = _load(scripts["image_sample"].main([*argv, "--use_plms", "True", "--log_dir", str(tmp_path / "a")]))
    again = _load(scripts["image_sample"].main([*argv, "--use_plms", "--log_dir", str(tmp_path / "b")]))
    ddpm = _load(scripts["image_sample"].main([*argv, "--log_dir", str(tmp_path / "c")]))
    assert plms["arr_0"].shape == (2, 8, 8, 3) and plms["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(plms["arr_0"], again["arr_0"])
    assert not np.array_equal(plms["arr_0"], ddpm["arr_0"])


def test_use_ddim_and_use_plms_together_are_refused(ckpt, scripts, tmp_path):
    with pytest.raises(UsageError, match="--use_ddim and --use_plms"):
        scripts["image_sample"].main(
            ["--model_path", ckpt["uncond"], "--num_samples", "2", "--use_ddim", "True", "--use_plms", "True",
             "--log_dir", str(tmp_path)]
        )


def test_classifier_sample_plms_scale_zero_is_close_to_unguided(ckpt, scripts, tmp_path):
    argv = _classifier_argv(ckpt, tmp_path / "g", "--classifier_scale", "0", "--use_plms", "True")
    guided = _load(scripts["classifier_sample"].main(argv))["arr_0"].astype(int)
    plain = _load(scripts["image_sample"].main(
        ["--model_path", ckpt["cond"], "--num_samples", "4", "--batch_size", "2", *STEPS, "--seed", "5",
         "--use_plms", "True", "--log_dir", str(tmp_path / "p")]))["arr_0"].astype(int)
    # PLMS guidance goes through eps -> x0 -> eps, exact only up to float rounding
    assert np.abs(guided - plain).max() <= 1
