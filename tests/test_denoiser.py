"""The denoiser view: one object per sampling loop answers the samplers' questions."""

import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.denoiser import Denoiser
from guided_diffusion.respace import SpacedDiffusion, space_timesteps

SHAPE = (2, 3, 4, 4)


def spaced(steps="10"):
    return SpacedDiffusion(
        space_timesteps(100, steps), betas=gd.get_named_beta_schedule("cosine", 100),
        model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE,
        loss_type=gd.LossType.MSE,
    )


class Recorder(torch.nn.Module):
    """A smooth toy model that records the timesteps it is called with."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(0.3))
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append(t.clone())
        scale = torch.cos(t.float() / 50).view(-1, 1, 1, 1)
        return torch.cat([self.weight * x * scale, torch.tanh(x)], dim=1)


def cond_fn(x, t, y=None):
    return -0.1 * x


def state(seed=0):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    return x, torch.tensor([9, 4])


def test_predict_is_p_mean_variance_with_the_loops_options():
    d, model = spaced(), Recorder()
    x, t = state()
    view = Denoiser(d, model, clip_denoised=True, denoised_fn=lambda x0: 0.5 * x0)
    got = view.predict(x, t)
    ref = d.p_mean_variance(model, x, t, clip_denoised=True, denoised_fn=lambda x0: 0.5 * x0)
    for key in ref:
        assert torch.equal(got[key], ref[key])


def test_the_model_sees_original_chain_timesteps_through_a_spaced_diffusion():
    d, model = spaced(), Recorder()
    x, t = state()
    Denoiser(d, model).x0(x, t)
    assert model.seen[-1].tolist() == [d.timestep_map[9], d.timestep_map[4]]


def test_guidance_shifts_the_score_for_x0_and_the_mean_for_ddpm():
    d, model = spaced(), Recorder()
    x, t = state(1)
    view = Denoiser(d, model, cond_fn=cond_fn)
    out = d.p_mean_variance(model, x, t)
    x0, guided_x0 = view.x0(x, t)
    assert torch.equal(x0, out["pred_xstart"])
    assert torch.equal(guided_x0, d.condition_score(cond_fn, out, x, t)["pred_xstart"])
    assert not torch.equal(guided_x0, x0)
    assert torch.equal(view.guided_mean(out, x, t), d.condition_mean(cond_fn, out, x, t))
    eps, guided, unguided = view.eps(x, t)
    assert torch.equal(guided, guided_x0) and torch.equal(unguided, x0)
    assert torch.equal(eps, d._predict_eps_from_xstart(x, t, guided_x0))


def test_without_guidance_both_x0_predictions_are_one_tensor():
    d, model = spaced(), Recorder()
    x, t = state(2)
    x0, guided = Denoiser(d, model, cond_fn=None).x0(x, t)
    assert x0 is guided


def test_guidance_through_the_model_returns_detached_tensors():
    d, model = spaced(), Recorder()
    x, t = state(3)

    def through_model(x, t, p_mean_var, y=None):
        return torch.autograd.grad(p_mean_var["pred_xstart"].sum(), x)[0]

    x0, guided = Denoiser(d, model, cond_fn=through_model, cond_fn_with_grad=True).x0(x, t)
    assert not x0.requires_grad and not guided.requires_grad
    assert not torch.equal(x0, guided)


def test_each_sampling_loop_builds_one_denoiser(monkeypatch):
    built = []

    class Counting(Denoiser):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    from guided_diffusion import samplers

    monkeypatch.setattr(samplers, "Denoiser", Counting)
    d, model = spaced(), Recorder()
    noise = torch.randn(SHAPE)
    for loop in (d.p_sample_loop, d.ddim_sample_loop, d.plms_sample_loop):
        built.clear()
        loop(model, SHAPE, noise=noise, cond_fn=cond_fn)
        assert len(built) == 1, loop.__name__
