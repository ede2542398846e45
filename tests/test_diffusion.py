"""Specifications of guided_diffusion.gaussian_diffusion beyond the golden fixtures."""

import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import SpacedDiffusion, space_timesteps

torch.set_num_threads(1)

SHAPE = (3, 2, 4, 4)


class TinyModel(torch.nn.Module):
    """A smooth, deterministic stand-in for a UNet: a fixed linear map of x plus a timestep term.

    With ``learned_variance`` it appends C channels of variance values in (-1, 1).
    """

    def __init__(self, channels=2, learned_variance=False, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.nn.Parameter(0.3 * torch.randn(channels, channels, generator=g))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(channels, generator=g))
        self.learned_variance = learned_variance

    def forward(self, x, t, y=None):
        out = torch.einsum("oc,bc...->bo...", self.mix, x)
        out = out + self.bias.view(1, -1, *([1] * (x.ndim - 2))) * torch.cos(t.float() / 7).view(-1, *([1] * (x.ndim - 1)))
        if y is not None:
            out = out + 0.01 * y.float().view(-1, *([1] * (x.ndim - 1)))
        if self.learned_variance:
            out = torch.cat([out, torch.tanh(x)], dim=1)
        return out


def make_diffusion(steps=20, schedule="cosine", mean=gd.ModelMeanType.EPSILON,
                   var=gd.ModelVarType.LEARNED_RANGE, loss=gd.LossType.MSE, **kw):
    return gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule(schedule, steps),
        model_mean_type=mean, model_var_type=var, loss_type=loss, **kw,
    )


def image(seed, shape=SHAPE):
    """An 8-bit image grid in [-1, 1]."""
    return torch.from_numpy(np.random.RandomState(seed).randint(0, 256, size=shape) / 127.5 - 1.0).float()


# ------------------------------------------------------------------ tables


@pytest.mark.parametrize("schedule,steps", [("linear", 50), ("linear", 1000), ("cosine", 10), ("cosine", 4000)])
def test_tables_are_float64_monotone_and_posterior_variance_nonnegative(schedule, steps):
    d = make_diffusion(steps, schedule)
    assert d.betas.dtype == np.float64 and d.posterior_variance.dtype == np.float64
    assert np.all(np.diff(d.alphas_cumprod) < 0)
    assert np.all(np.diff(d.sqrt_one_minus_alphas_cumprod) > 0)
    assert np.all(d.posterior_variance >= 0)
    assert d.posterior_variance[0] == 0
    assert np.all(np.isfinite(d.posterior_log_variance_clipped))
    # posterior variance never exceeds the forward-process variance beta_t
    assert np.all(d.posterior_variance <= d.betas + 1e-15)


def test_cached_gather_equals_original_extract_into_tensor():
    d = make_diffusion(50, "linear")
    t = torch.tensor([0, 7, 49])
    x = torch.zeros(3, 2, 5)
    for name in ("sqrt_recipm1_alphas_cumprod", "posterior_log_variance_clipped", "posterior_mean_coef2"):
        ref = gd._extract_into_tensor(getattr(d, name), t, x.shape)
        got = d._coef(name, t, x)
        assert got.dtype == torch.float32 and got.shape == x.shape
        assert torch.equal(got, ref)


def test_float64_data_gets_float64_coefficients():
    d = make_diffusion()
    x0 = image(1).double()
    t = torch.tensor([0, 5, 19])
    out = d.q_sample(x0, t, noise=torch.zeros_like(x0))
    expected = torch.from_numpy(d.sqrt_alphas_cumprod[[0, 5, 19]]).view(-1, 1, 1, 1) * x0
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


def test_eps_and_xstart_conversions_invert_each_other():
    d = make_diffusion()
    x0, eps = image(2), torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 9, 19])
    xt = d.q_sample(x0, t, noise=eps)
    torch.testing.assert_close(d._predict_xstart_from_eps(xt, t, eps), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d._predict_eps_from_xstart(xt, t, x0), eps, atol=1e-3, rtol=1e-3)
    mean, _, _ = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(d._predict_xstart_from_xprev(xt, t, mean), x0, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ losses and likelihood


def test_bpd_total_is_prior_plus_sum_of_vb_terms():
    d = make_diffusion(10)
    torch.manual_seed(0)
    out = d.calc_bpd_loop(TinyModel(learned_variance=True), image(4))
    assert out["vb"].shape == (SHAPE[0], 10) and out["mse"].shape == (SHAPE[0], 10)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(dim=1) + out["prior_bpd"])
    assert torch.all(out["vb"] >= 0) and torch.all(out["prior_bpd"] >= 0)


def test_bpd_columns_run_from_last_timestep_to_first():
    d = make_diffusion(6)
    model, x0 = TinyModel(learned_variance=True), image(5)
    torch.manual_seed(1)
    out = d.calc_bpd_loop(model, x0)
    torch.manual_seed(1)
    noises = [torch.randn_like(x0) for _ in range(6)]
    t0 = torch.zeros(SHAPE[0], dtype=torch.long)
    decoder = d._vb_terms_bpd(model, x0, d.q_sample(x0, t0, noise=noises[-1]), t0)["output"]
    torch.testing.assert_close(out["vb"][:, -1], decoder)


@pytest.mark.parametrize("per_call", [2, 4, 6, 7])
def test_batched_nll_equals_unbatched_and_draws_the_same_noise(per_call):
    d = make_diffusion(6)
    model, x0 = TinyModel(learned_variance=True), image(6)
    y = torch.tensor([1, 2, 3])
    torch.manual_seed(5)
    plain = d.calc_bpd_loop(model, x0, model_kwargs={"y": y})
    after_plain = torch.randn(3)
    torch.manual_seed(5)
    batched = d.calc_bpd_loop(model, x0, model_kwargs={"y": y}, timesteps_per_call=per_call)
    assert torch.equal(torch.randn(3), after_plain)
    assert sorted(batched) == sorted(plain)
    for key in plain:
        torch.testing.assert_close(batched[key], plain[key], atol=1e-6, rtol=1e-5)


def test_batched_nll_calls_the_model_once_per_group():
    d = make_diffusion(6)
    calls = []
    inner = TinyModel(learned_variance=True)

    def model(x, t, **kw):
        calls.append(t.tolist())
        return inner(x, t, **kw)

    d.calc_bpd_loop(model, image(7), timesteps_per_call=4)
    assert calls == [[5] * 3 + [4] * 3 + [3] * 3 + [2] * 3, [1] * 3 + [0] * 3]


def test_hybrid_loss_is_mse_plus_vb_and_vb_trains_only_the_variance():
    d = make_diffusion(10, loss=gd.LossType.RESCALED_MSE)
    model, x0 = TinyModel(learned_variance=True), image(8)
    x0.requires_grad_(False)
    t = torch.tensor([0, 4, 9])
    terms = d.training_losses(model, x0, t, noise=torch.randn(SHAPE))
    assert sorted(terms) == ["loss", "mse", "vb"]
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # The VB term sees a detached mean: its gradient w.r.t. the mean parameters is zero.
    terms["vb"].sum().backward()
    assert model.mix.grad is None or torch.count_nonzero(model.mix.grad) == 0


def test_rescaled_kl_is_kl_times_num_timesteps():
    x0, t, noise = image(9), torch.tensor([0, 3, 9]), torch.randn(SHAPE)
    model = TinyModel(learned_variance=True)
    kl = make_diffusion(10, loss=gd.LossType.KL).training_losses(model, x0, t, noise=noise)["loss"]
    rkl = make_diffusion(10, loss=gd.LossType.RESCALED_KL).training_losses(model, x0, t, noise=noise)["loss"]
    torch.testing.assert_close(rkl, kl * 10)


# ------------------------------------------------------------------ samplers


class GaussianDataOracle(torch.nn.Module):
    """The exact noise predictor when the data are N(0, s2 I): smooth, so DDIM's ODE is well behaved."""

    def __init__(self, alphas_cumprod, s2=0.25):
        super().__init__()
        self.register_buffer("abar", torch.from_numpy(alphas_cumprod).float())
        self.s2 = s2

    def forward(self, x, t):
        abar = self.abar[t].view(-1, *([1] * (x.ndim - 1)))
        return torch.sqrt(1 - abar) * x / (abar * self.s2 + 1 - abar)


def test_ddim_reverse_then_forward_recovers_the_input():
    betas = gd.get_named_beta_schedule("cosine", 1000)
    d = SpacedDiffusion(space_timesteps(1000, "ddim100"), betas=betas,
                        model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.FIXED_LARGE,
                        loss_type=gd.LossType.MSE)
    model = GaussianDataOracle(np.cumprod(1 - betas))
    x0 = 0.5 * image(10)
    x = x0
    with torch.no_grad():
        for i in range(d.num_timesteps):
            x = d.ddim_reverse_sample(model, x, torch.full((SHAPE[0],), i), clip_denoised=False)["sample"]
    assert (x - x0).abs().max() > 0.3  # the encoding is far from the input
    recovered = d.ddim_sample_loop(model, SHAPE, noise=x, clip_denoised=False, eta=0.0)
    torch.testing.assert_close(recovered, x0, atol=2e-2, rtol=0)


def test_ddim_reverse_draws_no_random_numbers():
    d = make_diffusion(10)
    torch.manual_seed(3)
    expected = torch.randn(4)
    torch.manual_seed(3)
    with torch.no_grad():
        d.ddim_reverse_sample(TinyModel(learned_variance=True), image(11), torch.tensor([0, 4, 9]))
    assert torch.equal(torch.randn(4), expected)


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_loops_draw_initial_noise_then_one_per_step(loop):
    steps = 5
    d = make_diffusion(steps)
    torch.manual_seed(11)
    getattr(d, loop)(TinyModel(learned_variance=True), SHAPE)
    after = torch.randn(4)
    torch.manual_seed(11)
    torch.randn(*SHAPE)
    for _ in range(steps):
        torch.randn(SHAPE)
    assert torch.equal(torch.randn(4), after)


@pytest.mark.parametrize("loop,kw", [("p_sample_loop", {}), ("ddim_sample_loop", {"eta": 0.5})])
def test_loops_are_reproducible_under_a_fixed_seed(loop, kw):
    d = make_diffusion(8)
    model = TinyModel(learned_variance=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(getattr(d, loop)(model, SHAPE, **kw))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(124)
    assert not torch.equal(getattr(d, loop)(model, SHAPE, **kw), runs[0])


def test_training_losses_and_nll_are_reproducible_under_a_fixed_seed():
    d = make_diffusion(6)
    model, x0, t = TinyModel(learned_variance=True), image(12), torch.tensor([0, 2, 5])
    results = []
    for _ in range(2):
        torch.manual_seed(9)
        results.append((d.training_losses(model, x0, t)["loss"], d.calc_bpd_loop(model, x0)["total_bpd"]))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_progressive_loop_yields_every_step_and_ends_with_the_loop_result():
    d = make_diffusion(4)
    model = TinyModel(learned_variance=True)
    torch.manual_seed(2)
    outs = list(d.p_sample_loop_progressive(model, SHAPE, progress=True))
    torch.manual_seed(2)
    final = d.p_sample_loop(model, SHAPE)
    assert len(outs) == 4 and sorted(outs[0]) == ["pred_xstart", "sample"]
    assert torch.equal(outs[-1]["sample"], final)


def test_loop_runs_a_plain_function_model_without_parameters():
    d = make_diffusion(3, var=gd.ModelVarType.FIXED_SMALL)
    sample = d.p_sample_loop(lambda x, t: torch.zeros_like(x), SHAPE)
    assert sample.shape == SHAPE and torch.isfinite(sample).all()


def test_guidance_with_zero_gradient_changes_nothing():
    d = make_diffusion(10)
    model, x, t = TinyModel(learned_variance=True), torch.randn(SHAPE), torch.tensor([0, 5, 9])
    pmv = d.p_mean_variance(model, x, t)
    zero = lambda x, t, **kw: torch.zeros_like(x)  # noqa: E731
    torch.testing.assert_close(d.condition_mean(zero, pmv, x, t), pmv["mean"])
    scored = d.condition_score(zero, pmv, x, t)
    torch.testing.assert_close(scored["pred_xstart"], pmv["pred_xstart"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scored["mean"], pmv["mean"], atol=1e-5, rtol=1e-5)


def test_guidance_moves_the_mean_along_the_gradient_scaled_by_the_variance():
    d = make_diffusion(10)
    model, x, t = TinyModel(learned_variance=True), torch.randn(SHAPE), torch.tensor([1, 5, 9])
    pmv = d.p_mean_variance(model, x, t)
    ones = lambda x, t, **kw: torch.ones_like(x)  # noqa: E731
    torch.testing.assert_close(d.condition_mean(ones, pmv, x, t) - pmv["mean"], pmv["variance"])


# ------------------------------------------------------------------ errors


def test_unknown_schedule_names_the_choices():
    with pytest.raises(NotImplementedError, match="'linear' or 'cosine'"):
        gd.get_named_beta_schedule("quadratic", 10)


def test_betas_above_one_explain_the_linear_schedule_limit():
    with pytest.raises(ValueError, match=r"T >= 20"):
        make_diffusion(10, "linear")


def test_timestep_out_of_range_says_the_valid_range():
    d = make_diffusion(10)
    with pytest.raises(IndexError, match=r"valid: 0\.\.9"):
        d.q_sample(image(1), torch.tensor([0, 3, 10]))
    with pytest.raises(IndexError, match="out of range"):
        d.q_sample(image(1), torch.tensor([0, -1, 3]))


def test_float_timesteps_are_rejected_with_a_hint():
    with pytest.raises(TypeError, match="integer tensor"):
        make_diffusion(10).q_sample(image(1), torch.tensor([0.0, 1.0, 2.0]))


def test_learned_variance_with_c_channel_model_asks_for_2c_channels():
    d = make_diffusion(10, var=gd.ModelVarType.LEARNED)
    with pytest.raises(ValueError, match=r"2\*C = 4 output channels"):
        d.p_mean_variance(TinyModel(), torch.randn(SHAPE), torch.tensor([0, 1, 2]))


def test_fixed_variance_with_2c_channel_model_suggests_learn_sigma():
    d = make_diffusion(10, var=gd.ModelVarType.FIXED_SMALL)
    with pytest.raises(ValueError, match="learn_sigma=True"):
        d.training_losses(TinyModel(learned_variance=True), image(1), torch.tensor([0, 1, 2]))


def test_reverse_ddim_rejects_nonzero_eta():
    d = make_diffusion(10)
    with pytest.raises(ValueError, match="eta=0.0; got eta=0.5"):
        d.ddim_reverse_sample(TinyModel(learned_variance=True), image(1), torch.tensor([0, 1, 2]), eta=0.5)


def test_nll_batch_must_be_positive():
    with pytest.raises(ValueError, match="--nll_batch"):
        make_diffusion(4).calc_bpd_loop(TinyModel(learned_variance=True), image(1), timesteps_per_call=0)


def test_device_tables_are_built_once_and_reused():
    d = make_diffusion(5)
    model = TinyModel(learned_variance=True)
    d.p_sample_loop(model, SHAPE)
    tables = d._device_tables[torch.device("cpu")]
    d.ddim_sample_loop(model, SHAPE)
    assert list(d._device_tables) == [torch.device("cpu")]
    assert d._device_tables[torch.device("cpu")] is tables
    assert all(v.dtype == torch.float64 for v in tables.values())
