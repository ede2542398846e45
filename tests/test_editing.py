"""Editing and inverse problems (guided_diffusion.editing): RePaint, DDIM inversion, SDEdit,
ILVR and DPS against plain sampling, an exactly solvable model and their own guarantees."""

import pytest
import torch

from guided_diffusion import editing, script_util, solvers
from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.outputs import to_uint8_images

from analytic import GaussianData, diffusion

torch.set_num_threads(1)

SHAPE = (2, 3, 8, 8)


def tiny(use_checkpoint=False, respacing="10"):
    """A perturbed class-conditional UNet with learned variances and attention, on a respaced chain."""
    flags = {**script_util.model_and_diffusion_defaults(), **script_util.model_extra_defaults()}
    flags.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
                 num_head_channels=8, learn_sigma=True, diffusion_steps=100, noise_schedule="cosine",
                 class_cond=True, num_classes=4, timestep_respacing=respacing, use_checkpoint=use_checkpoint)
    torch.manual_seed(0)  # the initial weights: the same model in every run
    model, diff = script_util.create_model_and_diffusion(**flags)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval().requires_grad_(False), diff


@pytest.fixture(scope="module")
def unet():
    return tiny()


@pytest.fixture
def image():
    g = torch.Generator().manual_seed(1)
    return (torch.rand(SHAPE, generator=g) * 2 - 1).round(decimals=1)


LABELS = {"y": torch.tensor([1, 3])}


def plain(unet, seed=5):
    model, d = unet
    torch.manual_seed(seed)
    return d.p_sample_loop(model, SHAPE, model_kwargs=LABELS)


# ------------------------------------------------------------------ RePaint


def test_repaint_schedule_denoises_each_stretch_jump_n_sample_times():
    assert editing.repaint_schedule(5, 1, 1) == [4, 3, 2, 1, 0, -1]
    times = editing.repaint_schedule(10, 3, 4)
    assert times[0] == 9 and times[-1] == -1
    assert all(abs(b - a) == 1 for a, b in zip(times, times[1:]))
    downs = [a for a, b in zip(times, times[1:]) if b < a]
    # arriving at t = 6, 3 and 0 (< 10 - 3) it goes back up 3 steps, 3 times each: every
    # step but the last (t = 0 to the image) runs 4 times
    assert sorted(downs) == [0] + sorted(t for t in range(1, 10) for _ in range(4))


def test_inpaint_with_an_all_zeros_mask_is_plain_sampling(unet, image):
    model, d = unet
    torch.manual_seed(5)
    got = editing.inpaint(d, model, image, torch.zeros(1, 1, 8, 8), model_kwargs=LABELS)
    torch.testing.assert_close(got, plain(unet), rtol=0, atol=0)


def test_inpaint_with_an_all_ones_mask_returns_the_input(unet, image):
    model, d = unet
    torch.manual_seed(5)
    assert torch.equal(editing.inpaint(d, model, image, torch.ones(1, 1, 8, 8), model_kwargs=LABELS), image)


def test_inpaint_keeps_the_known_region_and_fills_the_rest(unet, image):
    model, d = unet
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1
    torch.manual_seed(6)
    got = editing.inpaint(d, model, image, mask, jump_length=2, jump_n_sample=2, model_kwargs=LABELS)
    kept = to_uint8_images(got)[..., :4, :].astype(int) - to_uint8_images(image)[..., :4, :].astype(int)
    assert abs(kept).max() <= 1
    assert (got[..., 4:] - image[..., 4:]).abs().mean() > 0.1


def test_inpaint_refuses_a_mask_of_another_size(unet, image):
    model, d = unet
    with pytest.raises(ValueError, match=r"mask's shape \(1, 1, 4, 4\)"):
        editing.inpaint(d, model, image, torch.ones(1, 1, 4, 4))


# ------------------------------------------------------------------ DDIM inversion


def draws(data, count, seed):
    """``count`` samples of the Gaussian data."""
    noise = torch.randn(count, len(data.mu), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return data.mu + data.var.sqrt() * noise


def round_trip_rms(steps):
    """RMS error of DDIM invert-then-reconstruct on Gaussian data with exact eps."""
    d = diffusion()
    data = GaussianData(d)
    x0 = draws(data, 64, seed=1)
    x_T = editing.invert(d, data, x0, steps)
    return float((editing.reconstruct(d, data, x_T, steps) - x0).pow(2).mean().sqrt())


def test_inversion_round_trip_on_exact_eps_converges_at_first_order():
    coarse, fine = round_trip_rms(250), round_trip_rms(1000)
    assert fine <= 5e-3
    assert coarse / fine >= 3


@pytest.mark.parametrize("mean", ["START_X", "VELOCITY"])
def test_inversion_reads_x0_and_v_predicting_models_as_the_same_eps(mean):
    eps_chain, other_chain = diffusion(), diffusion(mean=getattr(gd.ModelMeanType, mean))
    data = GaussianData(eps_chain)

    def predict(x, t):  # the same exact model, answering with x_0 or v = alpha eps - sigma x_0
        alpha, sigma = (v.view(-1, 1) for v in eps_chain.model_schedule.alpha_sigma_at(t.double()))
        eps = data(x, t)
        x0 = (x - sigma * eps) / alpha
        return x0 if mean == "START_X" else alpha * eps - sigma * x0

    x0 = draws(data, 8, seed=2)
    x_T = editing.invert(eps_chain, data, x0, 20)
    torch.testing.assert_close(editing.invert(other_chain, predict, x0, 20), x_T, rtol=0, atol=1e-9)
    torch.testing.assert_close(editing.reconstruct(other_chain, predict, x_T, 20),
                               editing.reconstruct(eps_chain, data, x_T, 20), rtol=0, atol=1e-9)


def test_inversion_lands_on_the_chain_and_returns_its_trajectory(unet, image):
    model, d = unet
    x_T, path = editing.invert(d, model, image, 5, model_kwargs=LABELS, return_trajectory=True)
    assert len(path) == 6 and path[0] is image and path[-1] is x_T and x_T.dtype == image.dtype
    back = editing.reconstruct(d, model, x_T, 5, model_kwargs=LABELS)
    assert back.shape == image.shape and torch.isfinite(back).all()


def test_edict_round_trip_is_exact_at_few_steps_where_ddim_is_not():
    d = diffusion()
    data = GaussianData(d)
    x0 = draws(data, 64, seed=1)
    back = editing.edict_reconstruct(d, data, editing.edict_invert(d, data, x0, 10), 10)
    assert (back - x0).pow(2).mean().sqrt() < 1e-12
    assert round_trip_rms(10) > 0.1  # plain DDIM inversion at the same 10 steps


def test_edict_round_trip_through_a_unet_is_exact_to_rounding(unet, image):
    model, d = unet
    latents = editing.edict_invert(d, model, image, 8, model_kwargs=LABELS)
    assert all(v.shape == image.shape and v.dtype == image.dtype for v in latents)
    back = editing.edict_reconstruct(d, model, latents, 8, model_kwargs=LABELS)
    torch.testing.assert_close(back, image, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"mix must lie in \(0, 1\]"):
        editing.edict_invert(d, model, image, 8, mix=0)


# ------------------------------------------------------------------ SDEdit


def test_sdedit_at_strength_zero_returns_the_input(unet, image):
    model, d = unet
    assert torch.equal(editing.sdedit(d, model, image, 0.0, model_kwargs=LABELS), image)
    assert torch.equal(editing.sdedit(d, model, image, 0.0, solver="dpmpp_2m", model_kwargs=LABELS), image)


def test_sdedit_at_strength_one_is_plain_sampling(unet, image):
    model, d = unet
    torch.manual_seed(5)
    torch.testing.assert_close(editing.sdedit(d, model, image, 1.0, model_kwargs=LABELS), plain(unet), rtol=0, atol=0)


def test_sdedit_stays_nearer_the_guide_at_lower_strength(unet, image):
    model, d = unet

    def distance(strength, **kwargs):
        torch.manual_seed(7)
        return float((editing.sdedit(d, model, image, strength, model_kwargs=LABELS, **kwargs) - image).abs().mean())

    assert distance(0.2) < distance(0.9)
    assert distance(0.2, solver="dpmpp_2m", steps=4) < distance(0.9, solver="dpmpp_2m", steps=4)


def test_sdedit_with_a_solver_follows_the_exact_ode_from_the_noised_guide():
    # The guide noised to the grid's top is the start itself, not x_T to be carried down.
    d = diffusion("linear")
    data = GaussianData(d)
    g = torch.Generator().manual_seed(3)
    guide = torch.randn(8, 16, dtype=torch.float64, generator=g)
    noise = torch.randn(8, 16, dtype=torch.float64, generator=g)
    strength = 0.3
    sigma_max = float(d.model_schedule.karras_sigma_at(torch.tensor(strength * 999, dtype=torch.float64)))
    times = solvers.grid(d, "dpmpp_2m", 80, None, sigma_max)
    s0 = float(d.model_schedule.karras_sigma_at(torch.tensor(times[0])))
    exact = data.solution((guide + s0 * noise) / (1 + s0**2) ** 0.5, times)
    edited = editing.sdedit(d, data, guide, strength, solver="dpmpp_2m", steps=80, noise=noise, clip_denoised=False)
    assert float((edited - exact).abs().max()) < 1e-3


def test_sdedit_refuses_a_strength_outside_zero_one(unet, image):
    model, d = unet
    with pytest.raises(ValueError, match=r"strength must lie in \[0, 1\].*1.5"):
        editing.sdedit(d, model, image, 1.5)


# ------------------------------------------------------------------ ILVR


def test_ilvr_matches_the_references_low_pass(unet, image):
    model, d = unet
    torch.manual_seed(8)
    guided = editing.ilvr(d, model, image, down_factor=4, model_kwargs=LABELS)
    reference = editing.low_pass(image, 4)
    assert (editing.low_pass(guided, 4) - reference).abs().max() < 1e-5
    assert (editing.low_pass(plain(unet, 8), 4) - reference).abs().max() > 0.1


def test_ilvr_outside_its_step_range_is_plain_sampling(unet, image):
    model, d = unet
    torch.manual_seed(5)
    unguided = editing.ilvr(d, model, image, t_range=(d.num_timesteps, d.num_timesteps), model_kwargs=LABELS)
    torch.testing.assert_close(unguided, plain(unet), rtol=0, atol=0)


# ------------------------------------------------------------------ DPS


def residuals(unet, image, zeta):
    model, d = unet
    operator = editing.downsample_operator(2)
    torch.manual_seed(9)
    steps = list(editing.dps_progressive(d, model, operator, operator(image), SHAPE, zeta=zeta, model_kwargs=LABELS))
    final = (operator(image) - operator(steps[-1]["sample"])).flatten(1).norm(dim=1)
    return [s["residual"] for s in steps], final, steps[-1]["sample"]


def test_dps_at_zeta_zero_is_plain_sampling(unet, image):
    _, _, sample = residuals(unet, image, 0.0)
    torch.testing.assert_close(sample, plain(unet, 9), rtol=0, atol=0)


def test_dps_residual_falls_and_ends_below_unguided(unet, image):
    path, final, _ = residuals(unet, image, 4.0)  # a large step for a 10-step chain
    _, unguided, _ = residuals(unet, image, 0.0)
    assert (path[-1] < 0.5 * path[0]).all()
    assert (final < 0.5 * unguided).all()


def brighten(x, t, y=None):
    """A classifier gradient that pulls every pixel up: guidance shows as a brighter sample."""
    return torch.ones_like(x)


@pytest.mark.parametrize("operation", ["inpaint", "dps"])
def test_classifier_guidance_steers_the_filled_pixels(unet, image, operation):
    model, d = unet
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1

    def run(cond_fn):
        torch.manual_seed(4)
        if operation == "inpaint":
            return editing.inpaint(d, model, image, mask, cond_fn=cond_fn, model_kwargs=LABELS)
        return editing.dps(d, model, editing.mask_operator(mask), mask * image, SHAPE, zeta=1.0, cond_fn=cond_fn,
                           model_kwargs=LABELS)

    plain_run, guided = run(None), run(brighten)
    assert (guided[..., 4:] - plain_run[..., 4:]).mean() > 0.1
    if operation == "inpaint":
        assert torch.equal(guided[..., :4], image[..., :4])


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_a_frozen_unet_differentiates_with_respect_to_its_input(use_checkpoint):
    model, _ = tiny(use_checkpoint=use_checkpoint)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    direction = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([40, 40])
    leaf = x.clone().requires_grad_()
    gradient = torch.autograd.grad(model(leaf, t, **LABELS).pow(2).sum(), leaf)[0]
    with torch.no_grad():
        h = 1e-3
        slope = (model(x + h * direction, t, **LABELS).pow(2).sum() - model(x - h * direction, t, **LABELS).pow(2).sum())
    assert torch.isclose((gradient * direction).sum(), slope / (2 * h), rtol=1e-2)
