"""guided_diffusion.pretrained: folders round trip, every sampling script runs from one, re-headed fine-tuning."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import checkpoints, logger, pretrained
from guided_diffusion.digits_check import digit_to_image, load_real_digits
from guided_diffusion.flags import classifier_and_diffusion_defaults
from guided_diffusion.script_util import create_classifier_and_diffusion

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")

# A tiny class-conditional grayscale model of the digits (8x8, ten classes).
DIGITS = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
              num_heads=2, learn_sigma=True, diffusion_steps=50, class_cond=True, num_classes=10, in_channels=1)


def _nudged(model, seed):
    """Fresh models have zero output layers; perturb every weight so outputs depend on all of them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_pretrained_{name}", os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def quiet_logger(tmp_path):
    logger.configure(dir=str(tmp_path / "log"), format_strs=["log"])
    yield
    logger.configure(dir=str(tmp_path / "log2"), format_strs=[])


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """A pretrained folder of the digits model, with one EMA rate."""
    folder = tmp_path_factory.mktemp("digits_model")
    model, _ = pretrained.build(DIGITS)
    ema = {k: v + 1 for k, v in _nudged(model, 1).state_dict().items()}
    pretrained.save_pretrained(model, DIGITS, folder, ema={0.9999: ema}, preset="")
    return str(folder), model.state_dict(), ema


def _same(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_save_then_load_gives_bit_identical_weights_and_the_same_flags(digits_folder):
    folder, weights, ema = digits_folder
    assert sorted(os.listdir(folder)) == ["config.json", "ema_0.9999.safetensors", "model.safetensors"]
    model, diffusion = pretrained.from_pretrained(folder)
    assert _same(model.state_dict(), weights)
    assert _same(pretrained.from_pretrained(folder, ema_rate=0.9999)[0].state_dict(), ema)
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    assert {k: config[k] for k in DIGITS} == DIGITS
    assert config["guided_diffusion_version"] and config["preset"] == ""
    assert diffusion.num_timesteps == 50 and model.num_classes == 10


def test_a_plain_file_with_its_config_beside_it_loads_the_same_way(digits_folder, tmp_path):
    folder, weights, _ = digits_folder
    torch.save(weights, tmp_path / "model.pt")
    checkpoints.save_config(tmp_path, DIGITS)
    assert _same(pretrained.from_pretrained(tmp_path / "model.pt")[0].state_dict(), weights)


def test_a_changed_body_flag_is_still_an_error_naming_the_flags(digits_folder):
    with pytest.raises(checkpoints.CheckpointError, match="--num_channels 32 \\(you gave 64\\)"):
        pretrained.from_pretrained(digits_folder[0], num_channels=64)


def test_a_folder_without_weights_is_refused_with_its_contents(tmp_path):
    checkpoints.save_config(tmp_path, DIGITS)
    with pytest.raises(checkpoints.CheckpointError, match="has no model.safetensors"):
        pretrained.from_pretrained(tmp_path)


def _reheaded(folder, seed, **overrides):
    """(re-headed model, names logged, a fresh model of the new flags built from the same seed)."""
    torch.manual_seed(seed)
    model, _ = pretrained.from_pretrained(folder, **overrides)
    log = open(os.path.join(logger.get_dir(), "log.txt")).read()
    names = log.split("re-initialised (new shape): ")[-1].splitlines()[0]
    torch.manual_seed(seed)
    fresh, _ = pretrained.build(dict(DIGITS, **overrides))
    return model.state_dict(), names, fresh.state_dict()


@pytest.mark.parametrize("overrides, expected", [
    (dict(num_classes=5), ["label_emb.weight"]),
    (dict(in_channels=3), ["input_blocks.0.0.weight", "out.2.bias", "out.2.weight"]),
    (dict(learn_sigma=False), ["out.2.bias", "out.2.weight"]),
])
def test_reheading_loads_what_fits_and_reinitialises_the_rest_as_a_fresh_model(digits_folder, overrides, expected):
    folder, weights, _ = digits_folder
    state, names, fresh = _reheaded(folder, 7, **overrides)
    assert names.split(", ") == expected
    for key, value in state.items():
        assert torch.equal(value, fresh[key] if key in expected else weights[key]), key


def test_an_rgb_model_reheaded_to_grayscale_names_the_same_convolutions(digits_folder, tmp_path):
    folder, weights, _ = digits_folder
    rgb, _ = pretrained.from_pretrained(folder, in_channels=3)
    pretrained.save_pretrained(rgb, dict(DIGITS, in_channels=3), tmp_path)
    state, names, fresh = _reheaded(str(tmp_path), 8, in_channels=1)
    expected = ["input_blocks.0.0.weight", "out.2.bias", "out.2.weight"]
    assert names.split(", ") == expected
    for key, value in state.items():
        assert torch.equal(value, fresh[key] if key in expected else weights[key]), key


def test_a_reheaded_load_with_a_changed_body_names_the_flags_the_weights_imply(digits_folder):
    model, _ = pretrained.build(dict(DIGITS, num_classes=5, num_channels=64))
    with pytest.raises(checkpoints.CheckpointError,
                       match="--num_channels 32 \\(you gave 64\\).*--num_classes 10 \\(you gave 5\\)"):
        pretrained.init_from(model, digits_folder[0], flags=dict(DIGITS, num_classes=5, num_channels=64))


def test_to_adm_layout_squeezes_only_4d_attention_weights():
    state = {"a.qkv.weight": torch.ones(6, 2, 1, 1), "a.proj_out.weight": torch.ones(2, 2, 1, 1),
             "a.qkv.bias": torch.ones(6), "input_blocks.0.0.weight": torch.ones(2, 3, 1, 1)}
    shapes = {k: tuple(v.shape) for k, v in pretrained.to_adm_layout(state).items()}
    assert shapes == {"a.qkv.weight": (6, 2, 1), "a.proj_out.weight": (2, 2, 1), "a.qkv.bias": (6,),
                      "input_blocks.0.0.weight": (2, 3, 1, 1)}


def test_every_sampling_script_runs_from_a_folder_with_only_model_path(digits_folder, tmp_path):
    folder = digits_folder[0]
    image_sample, image_nll = _script("image_sample"), _script("image_nll")
    path = image_sample.main(["--model_path", folder, "--num_samples", "2", "--batch_size", "2",
                              "--timestep_respacing", "3", "--seed", "0", "--log_dir", str(tmp_path / "s")])
    with np.load(path) as npz:
        assert npz["arr_0"].shape == (2, 8, 8, 1) and npz["arr_1"].max() < 10
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(data / "3_0.png")
    image_nll.main(["--model_path", folder, "--data_dir", str(data), "--num_samples", "1",
                    "--log_dir", str(tmp_path / "n")])
    assert "final bpd=" in open(tmp_path / "n" / "log.txt").read()
    classifier_flags = dict(image_size=8, classifier_width=32, classifier_depth=1,
                            classifier_attention_resolutions="4", in_channels=1, num_classes=10, diffusion_steps=50)
    classifier, _ = create_classifier_and_diffusion(**dict(classifier_and_diffusion_defaults(), **classifier_flags))
    (tmp_path / "classifier").mkdir()
    torch.save(classifier.state_dict(), tmp_path / "classifier" / "model.pt")
    checkpoints.save_config(tmp_path / "classifier", classifier_flags)
    path = _script("classifier_sample").main(
        ["--model_path", folder, "--classifier_path", str(tmp_path / "classifier" / "model.pt"), "--num_samples", "2",
         "--batch_size", "2", "--timestep_respacing", "3", "--seed", "0", "--log_dir", str(tmp_path / "c")])
    with np.load(path) as npz:
        assert npz["arr_0"].shape == (2, 8, 8, 1)
    sr_flags = dict(large_size=16, small_size=8, num_channels=32, num_res_blocks=1, attention_resolutions="8",
                    diffusion_steps=50)
    sr_model, _ = pretrained.build(sr_flags)
    pretrained.save_pretrained(_nudged(sr_model, 2), sr_flags, tmp_path / "sr")
    np.savez(tmp_path / "base.npz", np.zeros((2, 8, 8, 3), np.uint8))
    path = _script("super_res_sample").main(
        ["--model_path", str(tmp_path / "sr"), "--base_samples", str(tmp_path / "base.npz"), "--num_samples", "2",
         "--batch_size", "2", "--timestep_respacing", "3", "--seed", "0", "--log_dir", str(tmp_path / "r")])
    with np.load(path) as npz:
        assert npz["arr_0"].shape == (2, 16, 16, 3)


def _digit_folder(root, classes, per_class):
    images, labels = load_real_digits()
    root.mkdir()
    for label in range(classes):
        for index in np.flatnonzero(labels == label)[:per_class]:
            digit_to_image(images[index], 8).save(root / f"{label}_{index:05d}.png")
    return str(root)


def test_init_from_reheads_a_digits_model_to_five_classes_trains_and_samples(digits_folder, tmp_path):
    folder, weights, _ = digits_folder
    data = _digit_folder(tmp_path / "digits", classes=5, per_class=2)
    run = tmp_path / "run"
    flags = [f"--{k}={v}" for k, v in dict(DIGITS, num_classes=5).items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    done = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "image_train.py"), "--init_from", folder, "--data_dir", data,
         *flags, "--batch_size", "2", "--max_steps", "2", "--save_interval", "2", "--log_dir", str(run)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = open(run / "log.txt").read()
    assert "re-initialised (new shape): label_emb.weight\n" in log
    saved = sorted(f for f in os.listdir(run) if f.startswith("model") and f.endswith(".pt"))
    assert saved[-1] == "model000002.pt"  # steps counted from 0, not from the checkpoint's
    trained = torch.load(run / "model000002.pt", weights_only=True)
    assert trained["label_emb.weight"].shape == (5, 128)
    path = _script("image_sample").main(
        ["--model_path", str(run / "model000002.pt"), "--num_samples", "2", "--batch_size", "2",
         "--timestep_respacing", "3", "--seed", "0", "--log_dir", str(tmp_path / "s")])
    with np.load(path) as npz:
        assert npz["arr_0"].shape == (2, 8, 8, 1) and npz["arr_1"].max() < 5
