"""The logSNR training core: v-prediction, loss weights, zero-terminal-SNR and shifted schedules,
and diffuse / undiffuse for custom loops, checked against closed forms in float64."""

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import loss_weights, prediction
from guided_diffusion import script_util as su
from guided_diffusion.errors import is_usage_error

SCHEDULES = ("linear", "cosine")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "diffusion.md"


def chain(schedule, mean_type=gd.ModelMeanType.EPSILON, betas=None, **kwargs):
    return gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule(schedule, 1000) if betas is None else betas,
        model_mean_type=mean_type, model_var_type=gd.ModelVarType.FIXED_SMALL, loss_type=gd.LossType.MSE,
        **kwargs,
    )


def snr_of(diffusion):
    """abar / (1 - abar), straight from the cumulative alphas (not through the logSNR table)."""
    abar = diffusion.alphas_cumprod
    return torch.from_numpy(abar / (1.0 - abar))


def weight_table(diffusion, weighting, mean_type):
    logsnr = torch.from_numpy(diffusion.schedule.logsnr)
    return weighting.weight(logsnr, prediction.for_mean_type(mean_type))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- loss weights


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_min_snr_closed_forms_for_eps_v_and_x0(schedule):
    d = chain(schedule)
    snr, gamma = snr_of(d), 5.0
    weighting = loss_weights.MinSNR(gamma)
    close(weight_table(d, weighting, "EPSILON"), torch.minimum(snr, torch.tensor(gamma)) / snr)
    close(weight_table(d, weighting, "VELOCITY"), torch.minimum(snr, torch.tensor(gamma)) / (snr + 1))
    close(weight_table(d, weighting, "START_X"), torch.minimum(snr, torch.tensor(gamma)))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("k, gamma", [(1.0, 1.0), (1.0, 0.5), (0.1, 2.0)])
def test_p2_is_one_over_k_plus_snr_to_the_gamma_on_eps(schedule, k, gamma):
    d = chain(schedule)
    close(weight_table(d, loss_weights.P2(k, gamma), "EPSILON"), 1.0 / (k + snr_of(d)) ** gamma)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_edm_weight_is_lambda_sigma_on_x0_and_lambda_sigma_squared_on_eps(schedule):
    d = chain(schedule)
    sigma_data = 0.5
    sigma = torch.sqrt(1.0 / snr_of(d))  # Karras et al.'s sigma = sqrt(1 - abar) / sqrt(abar)
    lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    weighting = loss_weights.EDM(sigma_data)
    close(weight_table(d, weighting, "START_X"), lam)
    close(weight_table(d, weighting, "EPSILON"), lam * sigma**2)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_snr_plus_one_is_the_unweighted_v_loss(schedule):
    d = chain(schedule)
    close(weight_table(d, loss_weights.SNRPlusOne(), "VELOCITY"), torch.ones(1000, dtype=torch.float64))


def test_a_weight_means_the_same_objective_whatever_the_target():
    # Same x_t, same model belief about x_0: the weighted MSE of each target is the same number.
    d = chain("cosine")
    t = torch.tensor([3, 200, 600, 990])
    x0, noise = torch.rand(4, 2, 3, 3, dtype=torch.float64) * 2 - 1, torch.randn(4, 2, 3, 3, dtype=torch.float64)
    x_t = d.q_sample(x0, t, noise)
    guess = x0 + 0.1 * torch.randn_like(x0)
    eps_guess = prediction.eps_from_x0(d, x_t, t, guess)
    outputs = {"START_X": guess, "EPSILON": eps_guess,
               "VELOCITY": d._coef("alpha", t, x_t) * eps_guess - d._coef("sigma", t, x_t) * guess}
    weighting = loss_weights.MinSNR(5.0)
    losses = []
    for name, output in outputs.items():
        target = prediction.for_mean_type(name).target(d, x0, x_t, t, noise)
        w = weighting.weight(d._gather64("logsnr", t), prediction.for_mean_type(name))
        losses.append(w * ((output - target) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-9, atol=0)
    torch.testing.assert_close(losses[2], losses[0], rtol=1e-9, atol=0)


def test_no_weight_keeps_the_original_loss_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 1).double()
    x0, t = torch.randn(4, 3, 4, 4, dtype=torch.float64), torch.tensor([0, 10, 500, 999])
    noise = torch.randn_like(x0)
    plain = su.create_gaussian_diffusion()
    named = su.create_gaussian_diffusion(loss_weight="none")
    a = plain.training_losses(lambda x, s: model(x), x0, t, noise=noise)
    b = named.training_losses(lambda x, s: model(x), x0, t, noise=noise)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["loss"], a["mse"])


def test_a_weight_multiplies_the_mse_term_only():
    d = su.create_gaussian_diffusion(steps=100, learn_sigma=True, loss_weight="p2", p2_gamma=0.5)
    plain = su.create_gaussian_diffusion(steps=100, learn_sigma=True)
    torch.manual_seed(0)
    x0, t = torch.randn(3, 2, 4, 4), torch.tensor([0, 40, 99])
    noise, output = torch.randn_like(x0), torch.randn(3, 4, 4, 4).clamp(-1, 1)
    weighted = d.training_losses(lambda x, s: output, x0, t, noise=noise)
    unweighted = plain.training_losses(lambda x, s: output, x0, t, noise=noise)
    assert torch.equal(weighted["vb"], unweighted["vb"])
    w = 1.0 / (1.0 + snr_of(plain)[t]) ** 0.5
    torch.testing.assert_close(weighted["loss"], w.float() * unweighted["mse"] + unweighted["vb"])


def test_unknown_loss_weight_names_the_choices():
    with pytest.raises(ValueError, match="min_snr") as error:
        su.create_gaussian_diffusion(loss_weight="minsnr")
    assert is_usage_error(error.value)


# ----------------------------------------------------------------------------- v-prediction


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_v_round_trips_to_x0_and_eps_in_float64(schedule):
    d = chain(schedule, gd.ModelMeanType.VELOCITY)
    t = torch.arange(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1000, 2, 3, dtype=torch.float64, generator=g)
    noise = torch.randn(1000, 2, 3, dtype=torch.float64, generator=g)
    x_t = d.q_sample(x0, t, noise)
    v = d.parameterisation.target(d, x0, x_t, t, noise)
    alpha, sigma = np.sqrt(d.alphas_cumprod), np.sqrt(1 - d.alphas_cumprod)
    close(v, torch.from_numpy(alpha)[:, None, None] * noise - torch.from_numpy(sigma)[:, None, None] * x0)
    pred_x0, pred_eps = d.parameterisation.to_x0_eps(d, v, x_t, t)
    torch.testing.assert_close(pred_x0, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(pred_eps, noise, rtol=0, atol=1e-12)


def test_v_from_scales_agrees_with_the_tables():
    d = chain("cosine", gd.ModelMeanType.VELOCITY)
    t = torch.tensor([0, 400, 999])
    v, x_t = torch.randn(3, 2, 2, 2, dtype=torch.float64), torch.randn(3, 2, 2, 2, dtype=torch.float64)
    alpha, sigma = d._coef("alpha", t, x_t), d._coef("sigma", t, x_t)
    x0, eps = d.parameterisation.from_scales(v, x_t, alpha, sigma)
    close(x0, d.parameterisation.to_x0(d, v, x_t, t))
    close(eps, d.parameterisation.to_eps(d, v, x_t, t))


def test_velocity_is_a_member_found_by_name_and_value_but_the_original_three_are_enumerated():
    import pickle

    velocity = gd.ModelMeanType.VELOCITY
    assert isinstance(velocity, gd.ModelMeanType) and velocity.name == "VELOCITY"
    assert gd.ModelMeanType["VELOCITY"] is velocity and gd.ModelMeanType(velocity.value) is velocity
    assert pickle.loads(pickle.dumps(velocity)) is velocity
    assert [m.name for m in gd.ModelMeanType] == ["PREVIOUS_X", "START_X", "EPSILON"]
    assert prediction.for_mean_type(velocity).mean_type == "VELOCITY"


def test_predict_v_builds_a_velocity_diffusion_and_refuses_predict_xstart_too():
    assert su.create_gaussian_diffusion(predict_v=True).model_mean_type == gd.ModelMeanType.VELOCITY
    with pytest.raises(ValueError, match="--predict_v"):
        su.create_gaussian_diffusion(predict_v=True, predict_xstart=True)


def _eps_and_v_models(diffusion):
    """A fixed eps-predicting function and the v-model equivalent to it: v = (eps - sigma_t x_t) / alpha_t,
    which is alpha_t eps - sigma_t x_0 with x_0 = (x_t - sigma_t eps) / alpha_t. The solvers also call
    at fractional t (between grid points), so alpha_t and sigma_t come from the interpolated log SNR."""

    def eps_model(x, t, **kwargs):
        return 0.9 * torch.tanh(1.3 * x) + 0.01 * t.to(x.dtype)[:, None, None, None]

    def v_model(x, t, **kwargs):
        a, s = (c[:, None, None, None] for c in diffusion.schedule.alpha_sigma_at(t))
        return (eps_model(x, t) - s * x) / a

    return eps_model, v_model


def test_a_v_model_samples_guides_and_scores_as_its_eps_equivalent_in_every_loop_and_solver():
    from guided_diffusion import solvers

    betas = gd.get_named_beta_schedule("cosine", 50)
    by_type = {m: chain("cosine", m, betas=betas) for m in (gd.ModelMeanType.EPSILON, gd.ModelMeanType.VELOCITY)}
    eps_model, v_model = _eps_and_v_models(by_type[gd.ModelMeanType.VELOCITY])
    models = {gd.ModelMeanType.EPSILON: eps_model, gd.ModelMeanType.VELOCITY: v_model}
    shape, x0 = (2, 1, 4, 4), torch.rand(2, 1, 4, 4, dtype=torch.float64) * 2 - 1
    noise = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def outputs(mean_type):
        d, model = by_type[mean_type], models[mean_type]
        out = {}
        for loop in ("p_sample_loop", "ddim_sample_loop", "plms_sample_loop"):
            torch.manual_seed(0)
            out[loop] = getattr(d, loop)(model, shape, noise=noise)
        torch.manual_seed(0)
        out["ddim eta 1"] = d.ddim_sample_loop(model, shape, noise=noise, eta=1.0)
        for name in solvers.SOLVERS:
            out[name] = solvers.run(d, model, shape, name, 6, noise=noise,
                                    generator=torch.Generator().manual_seed(0)).sample
        guide = dict(cond_fn=lambda x, t, **kwargs: -0.2 * x)  # the score of a wide Gaussian, through eps
        out["ddim guided"] = d.ddim_sample_loop(model, shape, noise=noise, **guide)
        out["unipc guided"] = solvers.run(d, model, shape, "unipc", 6, noise=noise, **guide).sample
        torch.manual_seed(0)
        out["bpd"] = d.calc_bpd_loop(model, x0)["total_bpd"]
        return out

    eps_out, v_out = outputs(gd.ModelMeanType.EPSILON), outputs(gd.ModelMeanType.VELOCITY)
    for name, expected in eps_out.items():
        torch.testing.assert_close(v_out[name], expected, rtol=0, atol=1e-9, msg=name)


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_zero_terminal_snr_keeps_the_first_alpha_and_ends_at_zero(schedule):
    betas = gd.get_named_beta_schedule(schedule, 1000)
    d = chain(schedule, gd.ModelMeanType.VELOCITY, betas=gd.rescale_zero_terminal_snr(betas))
    original = chain(schedule)
    assert d.alphas_cumprod[-1] == 0.0
    assert d.schedule.logsnr[-1] == -np.inf
    close(torch.tensor(np.sqrt(d.alphas_cumprod[0])), torch.tensor(np.sqrt(original.alphas_cumprod[0])))
    # sqrt(abar) is the original's, shifted and scaled (Lin et al. 2023, algorithm 1).
    root, old = np.sqrt(d.alphas_cumprod), np.sqrt(original.alphas_cumprod)
    expected = (old - old[-1]) * old[0] / (old[0] - old[-1])
    torch.testing.assert_close(torch.from_numpy(root), torch.from_numpy(expected), rtol=0, atol=1e-12)


def test_zero_terminal_snr_refuses_an_eps_model_naming_the_flags():
    with pytest.raises(ValueError, match="--predict_v True"):
        su.create_gaussian_diffusion(steps=50, noise_schedule="cosine", zero_terminal_snr=True)


def test_the_originals_short_linear_chain_still_builds_for_eps():
    # 20 linear steps scale beta_T to exactly 1 (abar_T = 0), as in the original: no refusal there.
    d = su.create_gaussian_diffusion(steps=20, noise_schedule="linear")
    assert d.schedule.reaches_zero_snr and d.model_mean_type == gd.ModelMeanType.EPSILON


def test_eps_weights_take_their_finite_limit_at_snr_zero():
    # The original's 20-step linear chain ends at SNR 0; min-SNR and P2 on eps have finite limits there.
    t = torch.tensor([19])
    for name, limit in (("min_snr", 1.0), ("p2", 1.0 / 2.0**1.5)):
        d = su.create_gaussian_diffusion(steps=20, noise_schedule="linear", loss_weight=name, p2_k=2.0, p2_gamma=1.5)
        assert float(d._loss_weight_at(t, torch.zeros(1, 3))) == pytest.approx(limit)


def test_shifted_cosine_moves_log_snr_by_minus_two_log_s():
    shift, steps = 2.0, 1000
    plain = gd.get_named_beta_schedule("cosine", steps)
    shifted = gd.get_named_beta_schedule("cosine", steps, shift=shift)
    assert np.array_equal(gd.get_named_beta_schedule("cosine", steps, shift=1.0), plain)

    def logit_abar(betas):
        abar = np.cumprod(1 - betas)
        return np.log(abar) - np.log1p(-abar)

    # Each table is its continuous abar(t) over abar(0); undo that to compare continuous log SNRs.
    def cosine(t):
        return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2

    t = np.arange(1, steps + 1) / steps
    uncapped = slice(0, 900)  # before the 0.999 cap on the betas
    continuous = np.log(cosine(t)) - np.log1p(-cosine(t))
    abar_shifted0 = gd._shift_alpha_bar(cosine(0.0), shift)
    table = np.cumprod(1 - shifted) * abar_shifted0
    np.testing.assert_allclose((np.log(table) - np.log1p(-table))[uncapped],
                               (continuous - 2 * np.log(shift))[uncapped], rtol=1e-9, atol=1e-9)
    assert (logit_abar(shifted)[uncapped] < logit_abar(plain)[uncapped]).all()


def test_schedule_shift_needs_the_cosine_schedule():
    with pytest.raises(ValueError, match="--noise_schedule cosine"):
        su.create_gaussian_diffusion(schedule_shift=2.0)


# ----------------------------------------------------------------------------- diffuse / undiffuse


def test_diffuse_and_undiffuse_invert_each_other():
    d = su.create_gaussian_diffusion(steps=100, predict_v=True, loss_weight="min_snr")
    x0 = torch.rand(5, 1, 4, 4, dtype=torch.float64) * 2 - 1
    out = d.diffuse(x0)
    back = d.undiffuse(out["target"], out["x_t"], out["t"])
    torch.testing.assert_close(back["pred_xstart"], x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(back["eps"], out["noise"], rtol=0, atol=1e-12)
    snr = snr_of(d)[out["t"]]
    close(out["weight"], torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def _docs_loop():
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    loops = [b for b in blocks if "diffusion.diffuse(" in b]
    assert len(loops) == 1, "docs/diffusion.md has one custom training loop"
    return loops[0]


@pytest.mark.parametrize("extra", [{}, {"predict_v": True, "loss_weight": "min_snr"}])
def test_the_documented_custom_loop_reproduces_training_losses(extra):
    loop = _docs_loop()
    assert len(loop.strip().splitlines()) <= 15
    flags = {**su.model_and_diffusion_defaults(), **su.model_extra_defaults(), "image_size": 8,
             "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "", "in_channels": 1,
             "class_cond": True, "num_classes": 3, "channel_mult": "1", "diffusion_steps": 50,
             "noise_schedule": "cosine", **extra}
    torch.manual_seed(0)
    x_start, cond = torch.rand(4, 1, 8, 8) * 2 - 1, {"y": torch.tensor([0, 1, 2, 1])}
    namespace = {"flags": flags, "data": [(x_start, cond)]}
    # The loop builds its model from flags after this seed: rebuild the same one to compare against.
    torch.manual_seed(1)
    exec(loop, namespace)
    torch.manual_seed(1)
    model, diffusion = su.create_model_and_diffusion(**flags)
    reference = copy.deepcopy(model)
    d = namespace["d"]
    losses = diffusion.training_losses(reference, x_start, d["t"], model_kwargs=cond, noise=d["noise"])
    assert torch.equal(namespace["loss"].detach(), losses["loss"].mean().detach())


# ----------------------------------------------------------------------------- zero terminal SNR end to end

ZERO_SNR = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="",
                in_channels=1, learn_sigma=True, diffusion_steps=10, noise_schedule="cosine",
                predict_v=True, zero_terminal_snr=True, loss_weight="min_snr")


def _zero_snr_model(respacing=""):
    flags = {**su.model_and_diffusion_defaults(), **su.model_extra_defaults(), **ZERO_SNR,
             "timestep_respacing": respacing}
    torch.manual_seed(0)
    model, diffusion = su.create_model_and_diffusion(**flags)
    with torch.no_grad():
        for param in model.parameters():  # the output layer starts at zero; give it something to say
            param.add_(0.05 * torch.randn_like(param))
    return model.eval(), diffusion


def test_a_zero_terminal_snr_v_model_trains_samples_and_scores_finitely():
    from guided_diffusion import solvers

    model, diffusion = _zero_snr_model()
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    last = torch.full((2,), diffusion.num_timesteps - 1)
    losses = diffusion.training_losses(model, x0, last)
    assert torch.isfinite(losses["loss"]).all() and torch.isfinite(losses["vb"]).all()
    with torch.no_grad():
        assert torch.isfinite(diffusion.p_sample_loop(model, (2, 1, 8, 8))).all()
        _, spaced = _zero_snr_model("5")  # plain counts keep the last (SNR-0) step
        assert spaced.schedule.reaches_zero_snr
        assert torch.isfinite(spaced.ddim_sample_loop(model, (2, 1, 8, 8))).all()
        for name in ("ddim", "dpmpp_2m", "unipc"):
            result = solvers.run(diffusion, model, (2, 1, 8, 8), name, 4, spacing="trailing")
            assert result.timesteps[0] == diffusion.num_timesteps - 1 and result.model_calls == 4
            assert torch.isfinite(result.sample).all()
            # From sigma 80, below the top: x_T is carried down from SNR 0 on the first step's call.
            lowered = solvers.run(diffusion, model, (2, 1, 8, 8), name, 4, spacing="trailing", sigma_max=80)
            assert lowered.timesteps[0] < diffusion.num_timesteps - 1 and lowered.model_calls == 4
            assert torch.isfinite(lowered.sample).all()
        bpd = diffusion.calc_bpd_loop(model, x0)
    assert torch.isfinite(bpd["total_bpd"]).all() and torch.isfinite(bpd["mse"]).all()


def test_plms_refuses_to_step_from_snr_zero():
    model, diffusion = _zero_snr_model()
    with pytest.raises(ValueError, match="PLMS cannot step from SNR 0"):
        diffusion.plms_sample_loop(model, (1, 1, 8, 8))


@pytest.mark.slow
def test_zero_terminal_snr_v_prediction_from_the_command_line(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    images = tmp_path / "images"
    images.mkdir()
    rs = np.random.RandomState(0)
    for i in range(4):
        Image.fromarray(rs.randint(0, 256, (8, 8), dtype=np.uint8)).save(images / f"img_{i}.png")
    flags = [f"--{k}={v}" for k, v in ZERO_SNR.items()]

    def run(script, *args):
        r = subprocess.run([sys.executable, str(scripts / script), *args], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return r.stdout

    run("image_train.py", "--data_dir", str(images), *flags, "--batch_size", "2", "--max_steps", "2",
        "--schedule_sampler", "logit-normal", "--save_interval", "2", "--log_dir", str(tmp_path / "run"))
    model = str(tmp_path / "run" / "ema_0.9999_000002.pt")
    run("image_sample.py", "--model_path", model, "--num_samples", "2", "--batch_size", "2", "--sampler", "ddim",
        "--spacing", "trailing", "--steps", "4", "--log_dir", str(tmp_path / "samples"))
    assert len(list((tmp_path / "samples").glob("samples_2x8x8x1.npz"))) == 1
    out = run("image_nll.py", "--model_path", model, "--data_dir", str(images), "--num_samples", "2",
              "--batch_size", "2", "--log_dir", str(tmp_path / "nll"))
    bpd = float(re.search(r"final bpd=([0-9.eE+-]+)", out).group(1))
    assert np.isfinite(bpd) and bpd > 0


# ----------------------------------------------------------------------------- timestep densities


def _nearest_step_histogram(diffusion, logsnr_draws):
    """An independent mapping: each drawn log SNR to the step whose table value is nearest."""
    ascending = diffusion.schedule.logsnr[::-1]
    above = np.clip(np.searchsorted(ascending, logsnr_draws), 1, len(ascending) - 1)
    below = above - 1
    closer = np.where(ascending[above] - logsnr_draws < logsnr_draws - ascending[below], above, below)
    return np.bincount(len(ascending) - 1 - closer, minlength=len(ascending)) / len(logsnr_draws)


@pytest.mark.parametrize("name, mean, std", [("lognormal", 2.4, 2.4), ("logit-normal", 0.0, 2.0)])
def test_density_is_the_normal_log_snr_mass_of_each_nearest_step(name, mean, std):
    from guided_diffusion.resample import create_named_schedule_sampler

    d = chain("linear")
    sampler = create_named_schedule_sampler(name, d)
    p = sampler.weights() / sampler.weights().sum()
    draws = np.random.RandomState(0).normal(mean, std, 400_000)
    expected = 0.999 * _nearest_step_histogram(d, draws) + 0.001 / 1000
    assert np.abs(np.cumsum(p) - np.cumsum(expected)).max() < 3e-3  # Kolmogorov distance, MC error ~1e-3


def test_lognormal_puts_half_its_mass_below_edm_median_sigma():
    from guided_diffusion.resample import create_named_schedule_sampler

    d = chain("cosine")
    p = create_named_schedule_sampler("lognormal", d).weights()
    median_step = np.searchsorted(np.cumsum(p) / p.sum(), 0.5)
    # EDM's median noise level exp(P_mean) = exp(-1.2) in sigma = sqrt(1 - abar) / sqrt(abar).
    assert abs(np.log(d.schedule.karras_sigma[median_step]) - (-1.2)) < 0.02


def test_density_importance_weights_keep_the_uniform_objective():
    from guided_diffusion.resample import create_named_schedule_sampler

    betas = gd.rescale_zero_terminal_snr(gd.get_named_beta_schedule("cosine", 200))
    d = chain("cosine", gd.ModelMeanType.VELOCITY, betas=betas)
    sampler = create_named_schedule_sampler("logit-normal", d)
    p = sampler.weights() / sampler.weights().sum()
    assert (p > 0).all()  # the SNR-0 step too, through the uniform share
    np.random.seed(0)
    t, w = sampler.sample(50_000, "cpu")
    torch.testing.assert_close(w.double(), torch.from_numpy(1 / (200 * p[t.numpy()])), rtol=1e-6, atol=0)
    losses = np.linspace(1.0, 2.0, 200) ** 2  # any per-step loss
    assert abs(np.sum(p * (1 / (200 * p)) * losses) - losses.mean()) < 1e-12
    frequencies = np.bincount(t.numpy(), minlength=200) / 50_000
    assert np.abs(np.cumsum(frequencies) - np.cumsum(p)).max() < 1e-2
