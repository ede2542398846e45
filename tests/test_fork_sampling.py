"""The guided-diffusion-sdk fork's sampling options: skip_timesteps, init_image,
randomize_class, guidance through the model (cond_fn_with_grad), DDIM transformations
and PLMS, against what the original fork returned (tests/golden/fork_sampling.npz)."""

from pathlib import Path

import numpy as np
import pytest
import torch as th

import guided_diffusion
from golden import fork_sampling as scenarios
from guided_diffusion.script_util import create_gaussian_diffusion

GOLDEN = Path(__file__).parent / "golden"
REFERENCE = np.load(GOLDEN / "fork_sampling.npz")


@pytest.fixture(scope="module")
def replayed():
    return scenarios.run(guided_diffusion)


@pytest.mark.parametrize("key", sorted(REFERENCE.files))
def test_matches_the_original_fork(replayed, key):
    ref, got = REFERENCE[key], replayed[key]
    assert got.shape == ref.shape and got.dtype == ref.dtype
    # Integer labels and RNG probes are exact; samples agree to float32 rounding (the
    # coefficients are gathered in float64 here, in float32 there).
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=5e-5 if ref.dtype.kind == "f" else 0)


def _diffusion(steps="20"):
    return create_gaussian_diffusion(steps=100, learn_sigma=True, noise_schedule="cosine", timestep_respacing=steps)


def test_plms_order_one_is_ddim_without_noise():
    diffusion, model = _diffusion(), scenarios.ToyModel()
    start = th.randn(scenarios.SHAPE, generator=th.Generator().manual_seed(0))
    ddim = diffusion.ddim_sample_loop(model, scenarios.SHAPE, noise=start.clone(), eta=0.0)
    th.manual_seed(5)
    plms = diffusion.plms_sample_loop(model, scenarios.SHAPE, noise=start.clone(), order=1)
    probe = th.rand(3)
    th.manual_seed(5)
    torch_rng_untouched = th.rand(3)
    np.testing.assert_allclose(plms.numpy(), ddim.numpy(), atol=1e-5)
    assert th.equal(probe, torch_rng_untouched)


def test_guidance_with_grad_sees_the_model_output_graph_and_unmapped_steps():
    diffusion, model = _diffusion(), scenarios.ToyModel()
    seen = []

    def cond_fn(x, t, p_mean_var, y=None):
        seen.append((x.requires_grad, p_mean_var["pred_xstart"].grad_fn is not None, t.tolist()))
        return th.autograd.grad(p_mean_var["pred_xstart"].sum(), x)[0]

    x = th.zeros(scenarios.SHAPE)
    with th.enable_grad():
        out = diffusion.ddim_sample_with_grad(model, x, th.tensor([4, 4]), cond_fn=cond_fn)
    # Respaced indices reach cond_fn as they are (the original fork does not map them).
    assert seen == [(True, True, [4, 4])]
    assert out["sample"].grad_fn is None and out["pred_xstart"].grad_fn is None


def test_ddim_reverse_sample_takes_model_kwargs_positionally():
    diffusion, model = _diffusion(), scenarios.ToyModel()
    x, t = th.zeros(scenarios.SHAPE), th.tensor([2, 2])
    positional = diffusion.ddim_reverse_sample(model, x, t, True, None, {"y": th.tensor([1, 4])})
    keyword = diffusion.ddim_reverse_sample(model, x, t, model_kwargs={"y": th.tensor([1, 4])})
    assert th.equal(positional["sample"], keyword["sample"])


@pytest.mark.parametrize("skip", [20, -1, 2.5])
def test_skip_timesteps_outside_the_chain_is_refused(skip):
    with pytest.raises(ValueError, match="skip_timesteps must be an integer from 0 to 19"):
        _diffusion().p_sample_loop(scenarios.ToyModel(), scenarios.SHAPE, skip_timesteps=skip)


def test_randomize_class_needs_a_class_conditional_model():
    model = scenarios.ToyModel()
    model.num_classes = None
    with pytest.raises(ValueError, match="class_cond=True"):
        _diffusion().ddim_sample_loop(
            model, scenarios.SHAPE, randomize_class=True, model_kwargs={"y": th.tensor([0, 1])}
        )


def test_randomize_class_without_labels_changes_nothing():
    diffusion, model = _diffusion(), scenarios.ToyModel()
    th.manual_seed(3)
    plain = diffusion.p_sample_loop(model, scenarios.SHAPE)
    th.manual_seed(3)
    randomized = diffusion.p_sample_loop(model, scenarios.SHAPE, randomize_class=True)
    assert th.equal(plain, randomized)


@pytest.mark.parametrize("order", [0, 5, 2.5, True])
def test_plms_order_outside_one_to_four_is_refused(order):
    with pytest.raises(ValueError, match="order must be an integer from 1 to 4"):
        _diffusion().plms_sample_loop(scenarios.ToyModel(), scenarios.SHAPE, order=order)


def test_plms_on_a_one_step_chain_returns_the_x0_prediction_like_ddim():
    diffusion, model = _diffusion("1"), scenarios.ToyModel()
    start = th.randn(scenarios.SHAPE, generator=th.Generator().manual_seed(1))
    plms = diffusion.plms_sample_loop(model, scenarios.SHAPE, noise=start.clone())
    ddim = diffusion.ddim_sample_loop(model, scenarios.SHAPE, noise=start.clone())
    np.testing.assert_allclose(plms.numpy(), ddim.numpy(), atol=1e-6)
