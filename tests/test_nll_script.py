"""Specifications of scripts/image_nll.py on a tiny model and a folder of 8x8 images."""

import copy
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import checkpoints, dist_util, script_util, sample_util
from guided_diffusion.errors import UsageError
from guided_diffusion.image_datasets import load_data

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "image_nll.py")
BIN = os.path.dirname(sys.executable)
FLAGS = dict(
    image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
    num_heads=1, learn_sigma=True, diffusion_steps=100, noise_schedule="cosine", timestep_respacing="6",
)
STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny learned-sigma model (config.json beside it) and 5 images."""
    root = tmp_path_factory.mktemp("nll")
    flags = {**script_util.model_and_diffusion_defaults(), **script_util.model_extra_defaults(), **FLAGS}
    model, diffusion = script_util.create_model_and_diffusion(**flags)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.eval()
    path = str(root / "model.pt")
    torch.save(model.state_dict(), path)
    checkpoints.save_config(str(root), flags)
    data_dir = root / "data"
    data_dir.mkdir()
    rng = np.random.RandomState(0)
    for i in range(5):
        Image.fromarray(rng.randint(0, 256, (8, 8, 3)).astype(np.uint8)).save(data_dir / f"img_{i}.png")
    return dict(model_path=path, data_dir=str(data_dir), model=model, diffusion=diffusion)


@pytest.fixture(scope="module")
def nll():
    spec = importlib.util.spec_from_file_location("_script_image_nll", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argv(setup, out, *extra):
    return ["--model_path", setup["model_path"], "--data_dir", setup["data_dir"], "--num_samples", "4",
            "--batch_size", "4", "--seed", "3", "--log_dir", str(out), *extra]


def _terms(out):
    terms = {}
    for name in ("vb", "mse", "xstart_mse"):
        with np.load(os.path.join(out, f"{name}_terms.npz")) as npz:
            assert npz.files == ["arr_0"]
            terms[name] = npz["arr_0"]
    return terms


def test_reported_bpd_equals_calc_bpd_loop_on_the_same_data(setup, nll, tmp_path):
    bpd = nll.main(_argv(setup, tmp_path))
    batch, _ = next(load_data(data_dir=setup["data_dir"], batch_size=4, image_size=8, deterministic=True,
                              random_flip=False))
    # The script's noise: rank 0, first round, drawn on the script's device (a GPU where there is one).
    device = dist_util.dev()
    torch.manual_seed(sample_util.derived_seed(3, 0, 0))
    with torch.no_grad():
        metrics = setup["diffusion"].calc_bpd_loop(copy.deepcopy(setup["model"]).to(device), batch.to(device),
                                                    clip_denoised=True)
    metrics = {k: v.cpu() for k, v in metrics.items()}
    assert bpd == pytest.approx(metrics["total_bpd"].mean().item(), rel=1e-6)
    terms = _terms(tmp_path)
    for name, values in terms.items():
        assert values.shape == (STEPS,) and values.dtype == np.float32
        np.testing.assert_allclose(values, metrics[name].mean(dim=0).numpy(), rtol=1e-5, atol=1e-7)
    # total bpd = prior + sum over timesteps of the vb terms
    assert bpd == pytest.approx(metrics["prior_bpd"].mean().item() + terms["vb"].sum(), rel=1e-5)


def test_batched_timesteps_give_the_same_numbers(setup, nll, tmp_path):
    one = nll.main(_argv(setup, tmp_path / "k1"))
    four = nll.main(_argv(setup, tmp_path / "k4", "--nll_batch", "4"))
    assert four == pytest.approx(one, rel=1e-5)
    for name, values in _terms(tmp_path / "k4").items():
        np.testing.assert_allclose(values, _terms(tmp_path / "k1")[name], rtol=1e-4, atol=1e-6)


def test_exactly_num_samples_images_are_evaluated(setup, nll, tmp_path, capsys):
    nll.main(_argv(setup, tmp_path, "--num_samples", "5", "--batch_size", "2"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done ")]
    assert [line.split(":")[0] for line in lines] == ["done 2 samples", "done 4 samples", "done 5 samples"]


def test_same_seed_same_bpd(setup, nll, tmp_path):
    assert nll.main(_argv(setup, tmp_path / "a")) == nll.main(_argv(setup, tmp_path / "b"))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--num_samples", "0"], "--num_samples must be a positive number, got 0"),
        (["--nll_batch", "0"], "--nll_batch must be a positive number, got 0"),
        (["--data_dir", "/nonexistent/images"], "--data_dir '/nonexistent/images': no such folder"),
    ],
)
def test_bad_flags_are_explained(setup, nll, tmp_path, extra, message):
    with pytest.raises(UsageError, match=message):
        nll.main(_argv(setup, tmp_path, *extra))


@pytest.mark.slow
def test_two_processes_evaluate_the_same_images(setup, tmp_path):
    """mpiexec -n 2: every image once, terms written once; bpd close to one process's (other noise)."""
    mpiexec = os.path.join(BIN, "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip("mpiexec is not installed beside this python")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, OPENAI_LOG_FORMAT="stdout,log")
    argv = _argv(setup, tmp_path, "--num_samples", "5", "--batch_size", "2")
    result = subprocess.run([mpiexec, "-n", "2", sys.executable, SCRIPT, *argv],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    done = [line for line in result.stdout.splitlines() if line.startswith("done ")]
    assert [line.split(":")[0] for line in done] == ["done 4 samples", "done 5 samples"]
    assert all(_terms(tmp_path)[name].shape == (STEPS,) for name in ("vb", "mse", "xstart_mse"))
