"""scripts/image_edit.py end to end on a tiny class-conditional model: every command writes the
documented files, and bad masks, images and strengths stop it with one clear line."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import checkpoints, editing, script_util
from guided_diffusion.errors import UsageError
from guided_diffusion.outputs import from_uint8_images, to_uint8_images

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "image_edit.py")
FLAGS = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
             num_heads=1, learn_sigma=True, diffusion_steps=100, noise_schedule="linear", class_cond=True,
             num_classes=4)
COUNT = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint with its config, an npz of three labelled images and a keep-the-left-half mask."""
    root = tmp_path_factory.mktemp("edit")
    flags = {**script_util.model_and_diffusion_defaults(), **script_util.model_extra_defaults(), **FLAGS}
    torch.manual_seed(0)  # the initial weights: the same model in every run
    model, _ = script_util.create_model_and_diffusion(**flags)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    torch.save(model.state_dict(), root / "model.pt")
    checkpoints.save_config(str(root), flags)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (COUNT, 8, 8, 3), dtype=np.uint8)
    np.savez(root / "images.npz", images, np.array([0, 2, 3]))
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "small_mask.png")
    return {"model": str(root / "model.pt"), "images": str(root / "images.npz"), "mask": str(root / "mask.png"),
            "small_mask": str(root / "small_mask.png"), "root": root, "pixels": images}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("_image_edit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(script, files, tmp_path, command, *flags, input=None):
    argv = [command, "--model_path", files["model"], "--input", input or files["images"], "--seed", "0",
            "--log_dir", str(tmp_path / command), *flags]
    return script.main(argv)


def load(path):
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


@pytest.mark.parametrize("command,flags,columns", [
    ("inpaint", ["--mask", "MASK", "--timestep_respacing", "4", "--jump_length", "2", "--jump_n_sample", "2"], 3),
    ("sdedit", ["--strength", "0.5", "--timestep_respacing", "4"], 2),
    ("sdedit", ["--strength", "0.7", "--sampler", "dpmpp_2m", "--steps", "3"], 2),
    ("ilvr", ["--down_factor", "4", "--timestep_respacing", "4"], 2),
    ("restore", ["--operator", "sr4", "--timestep_respacing", "4", "--zeta", "0.5"], 3),
    ("restore", ["--operator", "deblur", "--timestep_respacing", "4", "--measurement_noise", "0.05"], 3),
    ("restore", ["--operator", "inpaint", "--mask", "MASK", "--timestep_respacing", "4"], 3),
])
def test_each_command_writes_results_labels_and_a_comparison_grid(script, files, tmp_path, command, flags, columns):
    flags = [files["mask"] if f == "MASK" else f for f in flags]
    path = run(script, files, tmp_path, command, *flags)
    assert os.path.basename(path) == "samples_3x8x8x3.npz"
    saved = load(path)
    assert saved["arr_0"].shape == (COUNT, 8, 8, 3) and saved["arr_0"].dtype == np.uint8
    assert saved["arr_1"].tolist() == [0, 2, 3]  # the input npz's labels
    grid = Image.open(path[: -len(".npz")] + "_compare.png")
    assert grid.size == (2 * (columns * 8 + 2) + 2, 2 * (8 + 2) + 2)  # 2 x 2 tiles, framed
    if command == "inpaint":
        kept = saved["arr_0"][:, :, :4].astype(int) - files["pixels"][:, :, :4].astype(int)
        assert abs(kept).max() <= 1


def test_invert_writes_the_latents_reconstruct_reads(script, files, tmp_path):
    latents = run(script, files, tmp_path, "invert", "--steps", "6")
    assert os.path.basename(latents) == "latents_3x8x8x3.npz"
    saved = load(latents)
    assert saved["arr_0"].dtype == np.float32 and saved["arr_1"].tolist() == [0, 2, 3]
    back = load(run(script, files, tmp_path, "reconstruct", "--steps", "6", input=latents))["arr_0"]

    flags = {**script_util.model_and_diffusion_defaults(), **script_util.model_extra_defaults(), **FLAGS}
    model, diffusion = script_util.create_model_and_diffusion(**flags)
    model.load_state_dict(torch.load(files["model"]))
    model.eval()
    labels = {"y": torch.tensor([0, 2, 3])}
    x_T = editing.invert(diffusion, model, from_uint8_images(files["pixels"]), 6, model_kwargs=labels)
    np.testing.assert_allclose(saved["arr_0"], x_T.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    expected = editing.reconstruct(diffusion, model, torch.from_numpy(saved["arr_0"]).permute(0, 3, 1, 2), 6,
                                   model_kwargs=labels)
    assert np.abs(back.astype(int) - to_uint8_images(expected).astype(int)).max() <= 1


def test_inpaint_reads_a_folder_of_images_and_one_mask_per_image(script, files, tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    keep = np.zeros((COUNT, 8, 8), bool)
    for i, pixels in enumerate(files["pixels"]):
        keep[i, :, : 2 + 2 * i] = True  # image i keeps its 2 + 2i left columns
        Image.fromarray(pixels).save(images / f"{i}.png")
        Image.fromarray(keep[i].astype(np.uint8) * 255).save(masks / f"{i}.png")
    result = load(run(script, files, tmp_path, "inpaint", "--mask", str(masks), "--timestep_respacing", "4",
                      "--class_label", "1", input=str(images)))["arr_0"]
    change = np.abs(result.astype(int) - files["pixels"].astype(int)).max(axis=-1)
    assert change[keep].max() <= 1 and change[~keep].mean() > 10
    for extra in (masks / "x.png", masks / "y.png"):  # 5 masks for 3 images
        Image.fromarray(keep[0].astype(np.uint8)).save(extra)
    with pytest.raises(UsageError, match=r"holds 5 masks for 3 images; give one, or one per image"):
        run(script, files, tmp_path, "inpaint", "--mask", str(masks), input=str(images))


@pytest.mark.parametrize("command,flags,message", [
    ("inpaint", ["--mask", "SMALL"], r"--mask .*small_mask.png' is 4x4 pixels but the images are 8x8"),
    ("sdedit", ["--strength", "1.5"], r"--strength 1.5 lies outside \[0, 1\]"),
    ("sdedit", ["--image_size", "16"], r"arr_0 has shape \(3, 8, 8, 3\), expected N x 16 x 16 x 3"),
    ("sdedit", ["--in_channels", "1"], r"arr_0 has shape \(3, 8, 8, 3\), expected N x 8 x 8 x 1"),
    ("inpaint", [], r"inpainting needs --mask"),
])
def test_bad_inputs_are_refused_naming_the_flag(script, files, tmp_path, command, flags, message):
    flags = [files["small_mask"] if f == "SMALL" else f for f in flags]
    with pytest.raises(UsageError, match=message):
        run(script, files, tmp_path, command, *flags)


def test_the_command_line_reports_a_bad_strength_in_one_line_with_status_2(files, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    result = subprocess.run(
        [sys.executable, SCRIPT, "sdedit", "--model_path", files["model"], "--input", files["images"],
         "--strength", "-0.1", "--log_dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "image_edit.py: error: --strength -0.1 lies outside [0, 1]: 0 keeps the input, 1 ignores it; "
        "pass e.g. --strength 0.5"
    ]


def test_an_unknown_command_is_refused(script):
    with pytest.raises(UsageError, match="the first argument must be a command, one of inpaint, sdedit"):
        script.parse_args(["paint", "--input", "x"])
