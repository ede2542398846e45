"""The few-step solvers: orders of accuracy on an exactly solvable model, agreement with the
original's DDIM loop and with k-diffusion, guidance, reproducibility and the ADM model API."""

import math

import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import script_util, solvers
from guided_diffusion.guidance import classifier_cond_fn
from guided_diffusion.respace import space_timesteps

import peers
from analytic import GaussianData, diffusion

torch.set_num_threads(1)

DETERMINISTIC = ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm")
STOCHASTIC = ("euler_a", "dpmpp_2m_sde")


def analytic_error(name, steps, spacing="logsnr", **options):
    d = diffusion()
    data = GaussianData(d)
    noise = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = solvers.run(d, data, noise.shape, name, steps, spacing=spacing, noise=noise, **options)
    return float((result.sample - data.solution(noise, result.timesteps)).abs().max())


@pytest.mark.parametrize("name,least", [
    ("ddim", 0.9), ("euler", 0.9), ("heun", 1.8), ("dpmpp_2m", 1.8), ("unipc", 1.8),
    ("dpmpp_3m", 2.3), ("ipndm", 2.3),
])
def test_error_falls_at_the_solvers_order(name, least):
    errors = [analytic_error(name, n) for n in (20, 40, 80)]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert min(orders) >= least, (errors, orders)


def test_a_lowered_top_carries_the_noise_down_from_the_chains_top():
    d = diffusion()
    data = GaussianData(d)
    noise = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = solvers.run(d, data, noise.shape, "dpmpp_2m", 80, spacing="logsnr", noise=noise, sigma_max=20.0)
    assert result.model_calls == 80  # the carry reuses the first step's model call
    from_top = data.solution(noise, [999.0, result.timesteps[-1]])
    from_sigma_max = data.solution(noise, result.timesteps)
    gap = float((from_top - from_sigma_max).abs().max())
    assert float((result.sample - from_top).abs().max()) < 0.1 * gap


def test_dpm_solver_2m_beats_ddim_fourfold_at_20_calls():
    assert analytic_error("dpmpp_2m", 20) <= 0.25 * analytic_error("ddim", 20)


def test_euler_is_deterministic_ddim():
    assert abs(analytic_error("euler", 15) - analytic_error("ddim", 15)) < 1e-9


# ------------------------------------------------------------------ the ADM model API


def tiny_unet(**overrides):
    flags = {**script_util.model_and_diffusion_defaults(), **script_util.model_extra_defaults()}
    flags.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
                 learn_sigma=True, diffusion_steps=100, noise_schedule="cosine", class_cond=True, num_classes=4)
    flags.update(overrides)
    model, diff = script_util.create_model_and_diffusion(**flags)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval(), diff


def test_ddim_on_the_adm_spacing_reproduces_the_originals_ddim_loop():
    model, base = tiny_unet()
    spaced = diffusion("cosine", 100, var=gd.ModelVarType.LEARNED_RANGE, respacing="ddim10")
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    kwargs = {"y": torch.tensor([0, 1, 3])}
    original = spaced.ddim_sample_loop(model, noise.shape, noise=noise, clip_denoised=True, model_kwargs=kwargs)
    ours = solvers.sample(base, model, noise.shape, "ddim", 10, spacing="adm", noise=noise, clip_denoised=True,
                          model_kwargs=kwargs)
    torch.testing.assert_close(ours, original, rtol=0, atol=2e-5)


def test_dpmpp_2m_on_karras_sigmas_equals_k_diffusions():
    sampling = peers.kdiffusion_sampling()
    if sampling is None:
        pytest.skip("k-diffusion could not be fetched (offline)")
    model, d = tiny_unet()
    noise = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kwargs = {"y": torch.tensor([2, 1])}
    ours = solvers.run(d, model, noise.shape, "dpmpp_2m", 12, spacing="karras", noise=noise, model_kwargs=kwargs)
    denoiser = solvers.to_karras_denoiser(d, model)
    sigmas = d.schedule.karras_sigma_at(torch.from_numpy(ours.timesteps))
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    theirs = sampling.sample_dpmpp_2m(denoiser, noise * torch.sqrt(1 + sigmas[0] ** 2), sigmas,
                                      extra_args=kwargs, disable=True)
    torch.testing.assert_close(ours.sample, theirs, rtol=1e-9, atol=1e-9)


def test_karras_denoiser_at_a_table_step_is_p_mean_variances_x0():
    model, d = tiny_unet()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([37, 37])
    kwargs = {"y": torch.tensor([0, 2])}
    ref = d.p_mean_variance(model, x, t, clip_denoised=False, model_kwargs=kwargs)["pred_xstart"]
    sigma = float(d.schedule.karras_sigma[37])
    got = solvers.to_karras_denoiser(d, model)(x / d.schedule.alpha[37], sigma, **kwargs)
    torch.testing.assert_close(got.float(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(solvers.SOLVERS))
def test_every_solver_samples_a_learned_sigma_class_conditional_model(name):
    model, d = tiny_unet()
    shape = (2, 3, 8, 8)
    result = solvers.run(d, model, shape, name, 5, model_kwargs={"y": torch.tensor([1, 3])}, clip_denoised=True,
                         generator=torch.Generator().manual_seed(5))
    assert result.sample.shape == shape and result.sample.dtype == torch.float32
    assert torch.isfinite(result.sample).all() and result.sample.abs().max() <= 1 + 1e-6
    assert result.model_calls == (9 if name == "heun" else 5)
    assert len(result.timesteps) == 5 and np.all(np.diff(result.timesteps) < 0)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "unipc"])
def test_a_respaced_diffusion_samples_the_models_own_chain(name):
    model, base = tiny_unet()
    spaced = diffusion("cosine", 100, var=gd.ModelVarType.LEARNED_RANGE, respacing="25")
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    kwargs = {"y": torch.tensor([1, 1])}
    on_base = solvers.sample(base, model, noise.shape, name, 6, noise=noise, model_kwargs=kwargs)
    on_spaced = solvers.sample(spaced, model, noise.shape, name, 6, noise=noise, model_kwargs=kwargs)
    torch.testing.assert_close(on_spaced, on_base, rtol=0, atol=0)


@pytest.mark.parametrize("name,options", [
    ("euler_a", {}), ("dpmpp_2m_sde", {}), ("ddim", {"eta": 1.0}), ("heun", {"s_churn": 10.0}),
])
def test_seeded_stochastic_solvers_are_reproducible(name, options):
    model, d = tiny_unet()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))

    def draw(seed):
        return solvers.sample(d, model, noise.shape, name, 6, noise=noise, model_kwargs={"y": torch.tensor([0, 1])},
                              generator=torch.Generator().manual_seed(seed), **options)

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


@pytest.mark.parametrize("name", list(solvers.SOLVERS))
def test_guidance_at_scale_zero_equals_unguided_sampling(name):
    model, d = tiny_unet()
    classifier = script_util.create_classifier(
        image_size=8, classifier_use_fp16=False, classifier_width=32, classifier_depth=1,
        classifier_attention_resolutions="4", classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True, classifier_pool="adaptive", classifier_channel_mult="1,2",
        num_classes=4,
    )
    kwargs = {"y": torch.tensor([2, 3])}
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))

    def run(cond_fn):
        return solvers.sample(d, model, noise.shape, name, 4, noise=noise, model_kwargs=kwargs, cond_fn=cond_fn,
                              generator=torch.Generator().manual_seed(9))

    torch.testing.assert_close(run(classifier_cond_fn(classifier, 0.0)), run(None), rtol=0, atol=0)
    guided = run(classifier_cond_fn(_perturbed(classifier), 30.0))
    assert not torch.allclose(guided, run(None))


def _perturbed(module):
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def test_dynamic_thresholding_bounds_x0_without_clipping_it_flat():
    model, d = tiny_unet()
    denoiser = solvers.KarrasDenoiser(d, model, dynamic_threshold=0.9)
    y = 30 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(11))
    x0 = denoiser(y, 30.0, y=torch.tensor([0, 1]))
    assert x0.abs().max() <= 1 + 1e-12
    assert (x0.abs() == 1).float().mean() < 0.2  # scaled, not mostly saturated


# ------------------------------------------------------------------ spacings and errors


@pytest.mark.parametrize("spacing", solvers.SPACINGS)
def test_spacings_give_decreasing_timesteps_inside_the_chain(spacing):
    d = diffusion("cosine", 1000)
    t = solvers.timesteps(d, 10, spacing)
    assert t.dtype == np.float64 and len(t) == 10
    assert np.all(np.diff(t) < 0) and t[-1] >= 0 and t[0] <= 999
    if spacing != "adm":
        assert t[0] == 999
    if spacing in ("time_uniform", "logsnr", "karras"):
        assert t[-1] == 0


def test_sigma_max_lowers_the_top_of_every_spacing_but_adm():
    d = diffusion("cosine", 1000)
    top = float(d.schedule.t_at_karras_sigma(torch.tensor([80.0]))[0])
    assert 980 < top < 999 and d.schedule.karras_sigma[-1] > 80
    for spacing in ("trailing", "time_uniform", "logsnr", "karras", "karras_trailing"):
        t = solvers.timesteps(d, 8, spacing, sigma_max=80.0)
        assert abs(t[0] - top) < 1 and np.all(np.diff(t) < 0), spacing
    with pytest.raises(ValueError, match="sigma_max and sigma_min do not apply"):
        solvers.timesteps(d, 8, "adm", sigma_max=80.0)


def test_trailing_ends_near_t_over_n_and_karras_trailing_ends_there_too():
    d = diffusion("cosine", 1000)
    trailing = solvers.timesteps(d, 10, "trailing")
    assert trailing.tolist() == [999.0, 899.0, 799.0, 699.0, 599.0, 499.0, 399.0, 299.0, 199.0, 99.0]
    karras = solvers.timesteps(d, 10, "karras_trailing")
    assert karras[0] == 999 and karras[-1] == 99
    sigma = d.schedule.karras_sigma_at(torch.from_numpy(karras)).numpy() ** (1 / 7)
    np.testing.assert_allclose(np.diff(sigma), np.diff(sigma).mean(), rtol=1e-6)


def test_the_default_grids_start_at_sigma_80_except_ddims():
    model, d = tiny_unet(diffusion_steps=1000)
    for name in ("dpmpp_2m", "heun", "euler"):
        t = solvers.run(d, model, (1, 3, 8, 8), name, 4, model_kwargs={"y": torch.tensor([0])}).timesteps
        assert float(d.schedule.karras_sigma_at(torch.tensor(t[0]))) == pytest.approx(80.0, rel=0.02)  # trailing rounds t
        if solvers.DEFAULT_SPACING[name] == "logsnr":
            assert float(d.schedule.karras_sigma_at(torch.tensor(t[-1]))) == pytest.approx(solvers.FEW_STEP_SIGMA_MIN)
    t = solvers.run(d, model, (1, 3, 8, 8), "ddim", 4, model_kwargs={"y": torch.tensor([0])}).timesteps
    assert t.tolist() == [750.0, 500.0, 250.0, 0.0]


@pytest.mark.parametrize("spacing", ["time_uniform", "logsnr", "karras"])
def test_sigma_min_raises_the_bottom_of_the_grid(spacing):
    d = diffusion("cosine", 1000)
    t = solvers.timesteps(d, 8, spacing, sigma_max=80.0, sigma_min=0.05)
    sigmas = d.schedule.karras_sigma_at(torch.from_numpy(t)).numpy()
    assert sigmas[-1] == pytest.approx(0.05) and sigmas[0] == pytest.approx(80.0) and np.all(np.diff(t) < 0)


def test_sigma_min_is_refused_where_the_spacing_fixes_its_end():
    d = diffusion("cosine", 1000)
    with pytest.raises(ValueError, match="sigma_min applies to time_uniform, logsnr and karras"):
        solvers.timesteps(d, 8, "trailing", sigma_min=0.05)
    with pytest.raises(ValueError, match="sigma_min must lie between"):
        solvers.timesteps(d, 8, "logsnr", sigma_min=1e-5)


def test_adm_spacing_is_the_originals_ddim_striding():
    d = diffusion("cosine", 1000)
    assert solvers.timesteps(d, 25, "adm").tolist() == list(range(960, -1, -40))
    assert solvers.timesteps(d, 80, "adm").tolist() == sorted(space_timesteps(1000, "80"), reverse=True)


def test_logsnr_spacing_is_uniform_in_log_snr():
    d = diffusion("cosine", 1000)
    logsnr = d.schedule.logsnr_at(torch.from_numpy(solvers.timesteps(d, 12, "logsnr"))).numpy()
    np.testing.assert_allclose(np.diff(logsnr), np.diff(logsnr).mean(), rtol=1e-6)


@pytest.mark.parametrize("call,message", [
    (lambda d, m: solvers.sample(d, m, (1, 3, 8, 8), "dpm_fast", 5), "unknown solver 'dpm_fast'"),
    (lambda d, m: solvers.sample(d, m, (1, 3, 8, 8), "ddim", 5, spacing="cosine"), "unknown spacing 'cosine'"),
    (lambda d, m: solvers.sample(d, m, (1, 3, 8, 8), "ddim", 0), "steps must be an integer from 1 to 100"),
    (lambda d, m: solvers.sample(d, m, (1, 3, 8, 8), "dpmpp_2m", 5, eta=1.0), "takes no option"),
    (lambda d, m: solvers.sample(d, m, (1, 3, 8, 8), "unipc", 5, order=5), "UniPC order must be 1, 2 or 3"),
])
def test_bad_arguments_are_refused_with_the_fix(call, message):
    model, d = tiny_unet(class_cond=False)
    with pytest.raises(ValueError, match=message):
        call(d, model)


def test_an_x_prev_model_is_refused():
    d = diffusion(mean=gd.ModelMeanType.PREVIOUS_X)
    with pytest.raises(ValueError, match="predicts eps or x_0"):
        solvers.sample(d, lambda x, t: x, (1, 4), "ddim", 5)
