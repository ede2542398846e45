"""ADM UNets exported to diffusers' UNet2DModel / DDPMScheduler give our numbers, and come back bit-exact.

diffusers is fetched for the tests only (tests/peers.py, without dependencies, no torch);
these tests skip when it cannot be had (offline).
"""

import importlib.util
import os

import numpy as np
import pytest
import torch

from guided_diffusion import diffusers_interop, pretrained
from peers import diffusers as load_diffusers

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", attention_resolutions="8,4",
            num_head_channels=16, diffusion_steps=100)


@pytest.fixture(scope="module")
def diffusers():
    module = load_diffusers()
    if module is None:
        pytest.skip("diffusers cannot be fetched (offline)")
    return module


def _random_model(flags, seed):
    """A model whose every weight is drawn afresh (no zero-initialised layer hides a mapping error)."""
    model, diffusion = pretrained.build(flags)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval(), diffusion


CASES = {
    "new order, unconditional": dict(use_new_attention_order=True),
    "legacy order, classes, learn_sigma, resblock up/down": dict(
        use_new_attention_order=False, class_cond=True, num_classes=7, learn_sigma=True, resblock_updown=True),
    "new order, classes, learn_sigma, resblock up/down, no scale-shift": dict(
        use_new_attention_order=True, class_cond=True, num_classes=7, learn_sigma=True, resblock_updown=True,
        use_scale_shift_norm=False),
    "legacy order by head count, cosine": dict(use_new_attention_order=False, num_head_channels=-1, num_heads=2,
                                               attention_resolutions="8", noise_schedule="cosine"),
}


@pytest.mark.parametrize("case", CASES)
def test_exported_unet_gives_our_output_and_imports_bit_exact(diffusers, case, tmp_path):
    flags = dict(TINY, **CASES[case])
    model, _ = _random_model(flags, seed=len(case))
    diffusers_interop.export(model, flags, tmp_path)
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet").eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=generator)
    t = torch.tensor([3, 77])
    y = torch.tensor([1, 5]) if flags.get("class_cond") else None
    with torch.no_grad():
        ours, theirs = model(x, t, y=y), unet(x, t, class_labels=y).sample
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    imported_flags, state = diffusers_interop.import_folder(tmp_path)
    assert {k: imported_flags[k] for k in flags} == flags
    original = model.state_dict()
    assert sorted(state) == sorted(original) and all(torch.equal(state[k], original[k]) for k in original)


@pytest.mark.parametrize("schedule, steps, learn_sigma", [("linear", 1000, True), ("cosine", 4000, False)])
def test_ddpm_scheduler_holds_our_schedule(diffusers, schedule, steps, learn_sigma, tmp_path):
    flags = dict(TINY, noise_schedule=schedule, diffusion_steps=steps, learn_sigma=learn_sigma)
    model, diffusion = pretrained.build(flags)
    diffusers_interop.export(model, flags, tmp_path)
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / "scheduler")
    expected = diffusion.alphas_cumprod.astype(np.float32)
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), expected, rtol=2e-5, atol=1e-7)
    assert scheduler.config.variance_type == ("learned_range" if learn_sigma else "fixed_large")


def test_a_v_prediction_zero_terminal_snr_model_exports_its_target_and_schedule(diffusers, tmp_path):
    flags = dict(TINY, noise_schedule="cosine", schedule_shift=2.0, zero_terminal_snr=True, predict_v=True)
    model, diffusion = pretrained.build(flags)
    diffusers_interop.export(model, flags, tmp_path)
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), diffusion.alphas_cumprod.astype(np.float32),
                               rtol=2e-5, atol=1e-7)
    assert diffusion.alphas_cumprod[-1] == 0
    imported_flags, _ = diffusers_interop.import_folder(tmp_path)
    assert {k: imported_flags[k] for k in flags} == flags


def test_the_import_without_our_flags_reads_the_diffusers_configs(diffusers, tmp_path):
    flags = dict(TINY, use_new_attention_order=True, class_cond=True, num_classes=7, learn_sigma=True,
                 noise_schedule="cosine")
    model, _ = _random_model(flags, seed=3)
    diffusers_interop.export(model, flags, tmp_path)
    os.remove(tmp_path / diffusers_interop.FLAGS_NAME)
    imported_flags, state = diffusers_interop.import_folder(tmp_path)
    assert {k: imported_flags[k] for k in flags} == flags
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("overrides, flag", [
    (dict(num_head_channels=-1, num_heads=2, attention_resolutions="16,8"), "--num_head_channels"),
    (dict(channel_mult="2,2,2"), "--channel_mult"),
    (dict(rescale_timesteps=True), "--rescale_timesteps"),
])
def test_what_unet2dmodel_cannot_express_is_refused_naming_the_flag(overrides, flag, tmp_path):
    flags = dict(TINY, **overrides)
    model, _ = pretrained.build(flags)
    with pytest.raises(ValueError, match=f"cannot export to diffusers' UNet2DModel: .*{flag}"):
        diffusers_interop.export(model, flags, tmp_path)


def test_super_resolution_models_are_out_of_scope(tmp_path):
    flags = dict(large_size=16, small_size=8, num_channels=32, num_res_blocks=1, attention_resolutions="8")
    model, _ = pretrained.build(flags)
    with pytest.raises(ValueError, match="super-resolution models and classifiers are out of scope"):
        diffusers_interop.export(model, flags, tmp_path)


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_interop_{name}", os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_script_and_its_reverse_round_trip_a_pretrained_folder(diffusers, tmp_path):
    flags = dict(TINY, use_new_attention_order=False, learn_sigma=True)
    model, _ = _random_model(flags, seed=5)
    pretrained.save_pretrained(model, flags, tmp_path / "ours")
    script = _script("export_diffusers")
    script.main(["--model_path", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")])
    assert diffusers.UNet2DModel.from_pretrained(tmp_path / "hf" / "unet").config.out_channels == 6
    script.main(["--reverse", "--model_path", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    back, _ = pretrained.from_pretrained(tmp_path / "back")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_consistency_model_checkpoint_is_refused_naming_its_preset(tmp_path):
    with pytest.raises(ValueError, match="ct_bedroom256 is a consistency-models checkpoint"):
        _script("export_diffusers").main(["--model_path", str(tmp_path / "ct_bedroom256.pt"),
                                          "--out", str(tmp_path / "hf")])


def _diffusers_folder(diffusers, folder, seed, **unet_config):
    """A UNet2DModel in the ADM layout and a DDPMScheduler, each written by diffusers' own save_pretrained."""
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=6, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16, flip_sin_to_cos=True, freq_shift=0, resnet_time_scale_shift="scale_shift",
        num_class_embeds=5, **unet_config,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in unet.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    unet.save_pretrained(folder / "unet")
    # diffusers' default linear betas (1e-4 to 0.02 over 1000 steps) are ADM's linear schedule
    diffusers.DDPMScheduler(variance_type="learned_range").save_pretrained(folder / "scheduler")
    return unet.eval()


def test_a_folder_diffusers_wrote_imports_and_gives_its_output(diffusers, tmp_path):
    unet = _diffusers_folder(diffusers, tmp_path, seed=11, attn_norm_num_groups=32)
    flags, state = diffusers_interop.import_folder(tmp_path)
    assert flags["learn_sigma"] and flags["num_classes"] == 5
    assert flags["noise_schedule"] == "linear" and flags["diffusion_steps"] == 1000
    model, _ = pretrained.build(flags)
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([4, 900]), torch.tensor([0, 4])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, t, y=y), unet(x, t, class_labels=y).sample, rtol=0, atol=1e-5)


def test_a_unet2dmodel_without_the_middle_attention_norm_is_refused(diffusers, tmp_path):
    _diffusers_folder(diffusers, tmp_path, seed=12)  # attn_norm_num_groups unset: no GroupNorm before attention
    with pytest.raises(ValueError, match="not in the ADM layout \\(attn_norm_num_groups=None"):
        diffusers_interop.import_folder(tmp_path)
