"""The prediction seam: every ModelMeanType has one parameterisation, and its conversions agree."""

import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import prediction
from guided_diffusion.respace import SpacedDiffusion, space_timesteps

SHAPE = (4, 3, 5, 5)
T = torch.tensor([0, 1, 500, 999])


def diffusion(mean_type=gd.ModelMeanType.EPSILON, respacing=None):
    kwargs = dict(
        betas=gd.get_named_beta_schedule("cosine", 1000), model_mean_type=mean_type,
        model_var_type=gd.ModelVarType.FIXED_SMALL, loss_type=gd.LossType.MSE,
    )
    if respacing:
        return SpacedDiffusion(space_timesteps(1000, respacing), **kwargs)
    return gd.GaussianDiffusion(**kwargs)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(SHAPE, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return x0, noise


def test_every_model_mean_type_has_a_parameterisation():
    for member in gd.ModelMeanType:
        assert prediction.for_mean_type(member).mean_type == member.name


def test_unknown_mean_type_is_refused_with_the_known_ones():
    with pytest.raises(NotImplementedError, match="EPSILON"):
        prediction.for_mean_type("VELOCITY_TYPO")


@pytest.mark.parametrize("member", list(gd.ModelMeanType))
def test_the_training_target_converts_back_to_the_true_x0_and_eps(member):
    """A perfect model outputs the target; the seam must then recover the x_0 and noise used."""
    d = diffusion(member)
    x0, noise = data()
    if member == gd.ModelMeanType.PREVIOUS_X:  # at t = 0 the posterior mean carries no x_0
        t, x0, noise = T[1:], x0[1:], noise[1:]
    else:
        t = T
    x_t = d.q_sample(x0, t, noise=noise)
    param = d.parameterisation
    output = param.target(d, x0, x_t, t, noise)
    got_x0, got_eps = param.to_x0_eps(d, output, x_t, t)
    torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-9)
    # eps from x_0 is ill-conditioned where abar_t is ~1 (t = 0): 1/sqrt(1/abar - 1) ~ 1e2.
    torch.testing.assert_close(got_eps, noise, rtol=0, atol=1e-8)


@pytest.mark.parametrize("member", list(gd.ModelMeanType))
def test_p_mean_variance_is_the_seams_x0_and_mean(member):
    d = diffusion(member)
    x0, noise = data(1)
    x_t = d.q_sample(x0, T, noise=noise)
    output = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = d.p_mean_variance(lambda x, t: output, x_t, T, clip_denoised=False)
    param = prediction.for_mean_type(member)
    x0_hat = param.to_x0(d, output, x_t, T)
    assert torch.equal(out["pred_xstart"], x0_hat)
    assert torch.equal(out["mean"], param.mean(d, output, x0_hat, x_t, T))
    if member == gd.ModelMeanType.PREVIOUS_X:
        assert torch.equal(out["mean"], output)  # the mean as predicted, not rebuilt from x_0
    else:
        assert torch.equal(out["mean"], d.q_posterior_mean_variance(x0_hat, x_t, T)[0])


def test_training_losses_regress_onto_the_seams_target():
    for member in gd.ModelMeanType:
        d = diffusion(member)
        x0, noise = data(3)
        x_t = d.q_sample(x0, T, noise=noise)
        target = d.parameterisation.target(d, x0, x_t, T, noise)
        losses = d.training_losses(lambda x, t: target, x0, T, noise=noise)
        assert torch.all(losses["mse"] == 0), member


def test_the_originals_private_helpers_delegate_to_the_seam():
    d = diffusion(respacing="50")
    x0, noise = data(4)
    t = torch.tensor([0, 3, 20, 49])
    x_t = d.q_sample(x0, t, noise=noise)
    assert torch.equal(d._predict_xstart_from_eps(x_t, t, noise), prediction.x0_from_eps(d, x_t, t, noise))
    assert torch.equal(d._predict_eps_from_xstart(x_t, t, x0), prediction.eps_from_x0(d, x_t, t, x0))
    assert torch.equal(d._predict_xstart_from_xprev(x_t, t, x0), prediction.x0_from_xprev(d, x_t, t, x0))


def test_conversions_use_the_float64_tables_for_float64_data():
    d = diffusion()
    x0, noise = data(5)
    x_t = d.q_sample(x0, T, noise=noise)
    got = prediction.x0_from_eps(d, x_t, T, noise)
    abar = torch.from_numpy(d.alphas_cumprod[T.numpy()]).view(-1, 1, 1, 1)
    expected = x_t / abar.sqrt() - (1 / abar - 1).sqrt() * noise
    assert got.dtype == torch.float64
    # float32 coefficients would miss by ~1e-4 here; float64 ones agree to cancellation error.
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_shape_mismatch_names_both_tensors():
    d = diffusion()
    with pytest.raises(ValueError, match="eps shape .* must equal x_t shape"):
        prediction.x0_from_eps(d, torch.zeros(SHAPE), T, torch.zeros(4, 3, 5, 4))


def test_a_new_target_is_one_small_class():
    """A parameterisation registered under a new name is picked up by p_mean_variance and the loss."""

    class Doubled(prediction.Parameterisation):
        """A toy target, 2 x_0, to show the seam is the only place a target lives."""

        mean_type = "DOUBLED_X0"

        def to_x0(self, diffusion, output, x_t, t):
            return output / 2

        def target(self, diffusion, x_start, x_t, t, noise):
            return 2 * x_start

    prediction.PARAMETERISATIONS["DOUBLED_X0"] = Doubled()
    try:
        d = diffusion()
        d.model_mean_type = "DOUBLED_X0"
        x0, noise = data(6)
        out = d.p_mean_variance(lambda x, t: 2 * x0, d.q_sample(x0, T, noise=noise), T, clip_denoised=False)
        assert torch.equal(out["pred_xstart"], x0)
        losses = d.training_losses(lambda x, t: 2 * x0, x0, T, noise=noise)
        assert np.allclose(losses["mse"].numpy(), 0)
    finally:
        del prediction.PARAMETERISATIONS["DOUBLED_X0"]
