"""Consistency-model checkpoints: their layout loads through the presets, and the Karras-denoiser samplers run."""

import importlib.util
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from guided_diffusion import checkpoints, consistency, presets, pretrained
from peers import kdiffusion_sampling

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CM_PRESETS = [name for name, preset in presets.PRESETS.items() if preset["source"] == "consistency-models"]
# The consistency-models architecture (new head order, fixed variance, 64-channel heads) at toy size.
TINY_CM = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
               num_head_channels=16, use_new_attention_order=True, learn_sigma=False, class_cond=True,
               num_classes=10, use_scale_shift_norm=False, resblock_updown=True)


def _cm_layout(state_dict):
    """A state_dict as consistency_models saves it: attention qkv / proj_out as 2-D convolutions [*, C, 1, 1]."""
    return {k: v[..., None] if k.endswith((".qkv.weight", ".proj_out.weight")) else v for k, v in state_dict.items()}


def _random_model(flags, seed):
    model, _ = pretrained.build(flags)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


def test_the_twelve_released_checkpoints_have_presets_named_after_their_files():
    expected = {f"cd_{d}_l2" for d in ("imagenet64", "bedroom256", "cat256")}
    expected |= {f"cd_{d}_lpips" for d in ("imagenet64", "bedroom256", "cat256")}
    expected |= {f"ct_{d}" for d in ("imagenet64", "bedroom256", "cat256")}
    expected |= {f"edm_{d}_ema" for d in ("imagenet64", "bedroom256", "cat256")}
    assert set(CM_PRESETS) == expected


@pytest.mark.parametrize("name", ["cd_imagenet64_l2", "ct_bedroom256", "edm_cat256_ema"])
def test_a_state_dict_in_the_cm_layout_fits_the_preset_strictly(name):
    flags = presets.preset_flags(name)
    with torch.device("meta"):
        model, _ = pretrained.build(flags)
    released = _cm_layout(model.state_dict())
    assert any(v.dim() == 4 and k.endswith(".qkv.weight") for k, v in released.items())
    assert checkpoints.describe_mismatch(model.state_dict(), pretrained.to_adm_layout(released), flags=flags) == ""


def test_a_cm_layout_file_loads_and_gives_the_same_output_as_our_layout(tmp_path):
    model = _random_model(TINY_CM, seed=0)
    torch.save(_cm_layout(model.state_dict()), tmp_path / "cd_tiny.pt")
    loaded, _ = pretrained.from_pretrained(tmp_path / "cd_tiny.pt", **TINY_CM)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([-3.0, 5.0]), torch.tensor([1, 7])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y=y), model(x, t, y=y))


def test_a_2d_convolution_with_the_4d_weights_computes_our_qkv():
    """What consistency_models computes (conv2d on [B, C, H, W]) equals our conv1d on the squeezed weights."""
    block = _random_model(TINY_CM, seed=1).middle_block[1]
    weight = _cm_layout({"a.qkv.weight": block.qkv.weight.detach()})["a.qkv.weight"]
    h = torch.randn(2, 64, 2, 2)
    theirs = F.conv2d(h, weight, block.qkv.bias).reshape(2, 192, 4)
    with torch.no_grad():
        ours = block.qkv(h.reshape(2, 64, 4))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


class _Recorder(torch.nn.Module):
    """A network returning a fixed function of its inputs and recording what it was given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, x, t, **kwargs):
        self.seen.append((x.clone(), t.clone()))
        return torch.tanh(x) * self.weight + t[:, None, None, None] / 1000


def test_the_consistency_scalings_make_the_boundary_the_identity():
    denoiser = consistency.PreconditionedDenoiser(_Recorder(), "consistency", clip_denoised=False)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64) * 5
    assert torch.equal(denoiser(x, consistency.SIGMA_MIN), x)


@pytest.mark.parametrize("preconditioning", consistency.PRECONDITIONINGS)
def test_the_network_sees_c_in_x_and_250_log_sigma(preconditioning):
    network = _Recorder()
    denoiser = consistency.PreconditionedDenoiser(network, preconditioning, clip_denoised=False)
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    sigma = 3.0
    out = denoiser(x, sigma)
    seen_x, seen_t = network.seen[0]
    c_in = 1 / np.sqrt(sigma**2 + 0.25)
    torch.testing.assert_close(seen_x.double(), x * c_in)
    torch.testing.assert_close(seen_t.double(), torch.full((2,), 250 * np.log(sigma), dtype=torch.float64))
    shifted = sigma - (0.002 if preconditioning == "consistency" else 0.0)
    c_skip = 0.25 / (shifted**2 + 0.25)
    c_out = shifted * 0.5 * c_in
    expected = c_skip * x + c_out * (torch.tanh(seen_x.double()) + seen_t.double()[:, None, None, None] / 1000)
    torch.testing.assert_close(out, expected)


def test_multistep_visits_its_grid_points_and_ends_without_noise():
    network = _Recorder()
    denoiser = consistency.PreconditionedDenoiser(network, "consistency", clip_denoised=False)
    noise = torch.randn(2, 1, 2, 2)
    out = consistency.multistep(denoiser, noise, [0, 22, 39])
    grid = consistency.karras_sigmas(40)
    assert grid[0] == pytest.approx(80) and grid[-1] == pytest.approx(0.002)
    times = [float(t[0]) for _, t in network.seen]
    assert times == pytest.approx([250 * np.log(grid[0]), 250 * np.log(grid[22])], rel=1e-6)
    last_x = network.seen[-1][0].double() / (1 / np.sqrt(grid[22] ** 2 + 0.25))
    torch.testing.assert_close(out.double(), denoiser(last_x, float(grid[22])), rtol=1e-5, atol=1e-5)


def test_heun_over_the_edm_denoiser_matches_k_diffusion():
    sampling = kdiffusion_sampling()
    if sampling is None:
        pytest.skip("k-diffusion cannot be fetched (offline)")
    denoiser = consistency.PreconditionedDenoiser(_Recorder(), "edm", clip_denoised=False)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)).double()
    ours = consistency.solve(denoiser, noise, "heun", 6)
    sigmas = torch.from_numpy(np.append(consistency.karras_sigmas(6), 0.0))
    their_grid = sampling.get_sigmas_karras(6, 0.002, 80.0, rho=7.0)  # float32
    torch.testing.assert_close(their_grid, sigmas.float())
    theirs = sampling.sample_heun(lambda x, s: denoiser(x, s[0]), noise * 80.0, sigmas)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_cm_ts_must_increase_from_zero():
    with pytest.raises(ValueError, match="--cm_ts '5,3'.*increasing integers starting at 0"):
        consistency.parse_ts("5,3")


def _image_sample():
    spec = importlib.util.spec_from_file_location("_cm_image_sample", os.path.join(REPO, "scripts", "image_sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cm_file(tmp_path_factory):
    """A tiny consistency model in the released layout, with its flags beside it."""
    folder = tmp_path_factory.mktemp("cm")
    torch.save(_cm_layout(_random_model(TINY_CM, seed=2).state_dict()), folder / "model.pt")
    checkpoints.save_config(folder, TINY_CM)
    return str(folder / "model.pt")


@pytest.mark.parametrize("sampler", [
    ["--sampler", "cm_onestep"],
    ["--sampler", "cm_multistep", "--cm_ts", "0,3,5"],
    ["--sampler", "heun", "--denoiser", "edm", "--steps", "3"],
])
def test_consistency_sampling_runs_from_the_cli(cm_file, sampler, tmp_path):
    script = _image_sample()
    argv = ["--model_path", cm_file, "--num_samples", "2", "--batch_size", "2", "--seed", "0", *sampler]
    first = script.main([*argv, "--log_dir", str(tmp_path / "a")])
    again = script.main([*argv, "--log_dir", str(tmp_path / "b")])
    with np.load(first) as a, np.load(again) as b:
        assert a["arr_0"].shape == (2, 8, 8, 3) and a["arr_0"].std() > 0
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_a_karras_denoiser_refuses_the_original_loops_and_cfg(cm_file, tmp_path):
    script = _image_sample()
    base = ["--model_path", cm_file, "--num_samples", "2", "--batch_size", "2", "--log_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="--denoiser edm needs a sampler"):
        script.main([*base, "--denoiser", "edm"])
    with pytest.raises(ValueError, match="--cfg_scale works on the ADM chain"):
        script.main([*base, "--sampler", "cm_onestep", "--cfg_scale", "2"])
