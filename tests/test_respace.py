"""Specifications of guided_diffusion.respace."""

import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import SpacedDiffusion, space_timesteps

torch.set_num_threads(1)


def spaced(use_timesteps, steps=50, schedule="cosine", **kw):
    kw.setdefault("model_mean_type", gd.ModelMeanType.EPSILON)
    kw.setdefault("model_var_type", gd.ModelVarType.FIXED_SMALL)
    kw.setdefault("loss_type", gd.LossType.MSE)
    return SpacedDiffusion(use_timesteps, betas=gd.get_named_beta_schedule(schedule, steps), **kw)


class TimestepRecorder(torch.nn.Module):
    """Returns zeros (a C-channel eps prediction) and remembers the timesteps it was given."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        return torch.zeros_like(x)


def test_ddim_stride_keeps_every_kth_step_from_zero():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert max(space_timesteps(1000, "ddim25")) == 960


def test_sections_keep_first_and_last_step_of_each_section():
    steps = sorted(space_timesteps(100, "10,15,20"))
    assert len(steps) == 45
    assert steps[0] == 0 and 33 in steps and 34 in steps and 66 in steps and 67 in steps and steps[-1] == 99


def test_uneven_sections_round_half_to_even():
    # 7 steps in two sections of 4 and 3; stride 1.5 in the first gives 0, round(1.5)=2, round(3.0)=3
    assert sorted(space_timesteps(7, "3,3")) == [0, 2, 3, 4, 5, 6]


def test_list_and_string_section_counts_agree():
    assert space_timesteps(300, [10, 15, 20]) == space_timesteps(300, "10,15,20")


def test_one_step_and_full_chain():
    assert space_timesteps(1000, "1") == {0}
    assert space_timesteps(10, "10") == set(range(10))
    assert space_timesteps(1000, "ddim1") == {0}


def test_impossible_ddim_count_lists_the_possible_counts():
    with pytest.raises(ValueError, match=r"Possible ddim counts: .*\b500\b") as info:
        space_timesteps(1000, "ddim999")
    assert "ddim999" in str(info.value)


def test_too_many_steps_for_a_section_says_the_maximum():
    with pytest.raises(ValueError, match="at most 10"):
        space_timesteps(10, "20")
    with pytest.raises(ValueError, match="at most 4"):
        space_timesteps(10, "5,5,5")


def test_unparseable_respacing_shows_the_accepted_forms():
    with pytest.raises(ValueError, match="'ddimN'"):
        space_timesteps(100, "abc")
    with pytest.raises(ValueError, match="ddim50"):
        space_timesteps(100, "ddimx")


def test_respaced_chain_has_the_kept_steps_cumulative_alphas():
    base = gd.get_named_beta_schedule("linear", 100)
    keep = space_timesteps(100, "ddim20")
    d = spaced(keep, steps=100, schedule="linear")
    full_abar = np.cumprod(1 - base)
    np.testing.assert_allclose(d.alphas_cumprod, full_abar[sorted(keep)], rtol=1e-12)
    assert d.timestep_map == sorted(keep) and d.original_num_steps == 100


def test_unsorted_use_timesteps_with_duplicates_give_an_increasing_map():
    d = spaced([49, 0, 5, 20, 9, 5])
    assert d.timestep_map == [0, 5, 9, 20, 49] and d.num_timesteps == 5


def test_model_sees_original_chain_timesteps():
    d = spaced(space_timesteps(50, "5"))
    model = TimestepRecorder()
    d.p_sample_loop(model, (2, 3, 4, 4))
    assert [t.tolist() for t in model.seen] == [[s, s] for s in reversed(d.timestep_map)]
    assert all(t.dtype == torch.int64 for t in model.seen)


def test_rescaled_model_timesteps_are_floats_in_0_to_1000():
    d = spaced(space_timesteps(50, "5"), rescale_timesteps=True)
    model = TimestepRecorder()
    d.ddim_sample_loop(model, (1, 3, 4, 4))
    expected = [[s * 1000.0 / 50] for s in reversed(d.timestep_map)]
    assert [t.tolist() for t in model.seen] == expected
    assert all(t.dtype == torch.float32 for t in model.seen)


def test_guidance_function_sees_original_chain_timesteps():
    d = spaced(space_timesteps(50, "5"), model_var_type=gd.ModelVarType.FIXED_LARGE)
    seen = []

    def cond_fn(x, t, **kw):
        seen.append(t.tolist())
        return torch.zeros_like(x)

    d.p_sample_loop(TimestepRecorder(), (1, 3, 4, 4), cond_fn=cond_fn)
    assert seen == [[s] for s in reversed(d.timestep_map)]


@pytest.mark.parametrize("var", [gd.ModelVarType.FIXED_SMALL, gd.ModelVarType.FIXED_LARGE])
def test_single_step_respacing_samples_and_scores(var):
    d = spaced(space_timesteps(1000, "1"), steps=1000, model_var_type=var)
    assert d.num_timesteps == 1 and np.isfinite(d.posterior_log_variance_clipped).all()
    sample = d.p_sample_loop(TimestepRecorder(), (2, 3, 4, 4))
    assert torch.isfinite(sample).all()
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    bpd = d.calc_bpd_loop(TimestepRecorder(), x0)
    assert bpd["vb"].shape == (2, 1) and torch.isfinite(bpd["total_bpd"]).all()


def test_use_timesteps_outside_the_chain_are_rejected():
    with pytest.raises(ValueError, match=r"0\.\.49"):
        spaced([0, 10, 50])
