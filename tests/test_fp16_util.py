"""MixedPrecisionTrainer: loss scaling, overflow handling, unscaling of every master group."""

import math

import pytest
import torch
import torch.nn as nn

from guided_diffusion import logger
from guided_diffusion.fp16_util import (
    MixedPrecisionTrainer,
    TrainingDivergedError,
    convert_module_to_f16,
    get_param_groups_and_shapes,
    make_master_params,
    master_params_to_state_dict,
    state_dict_to_master_params,
)


class TinyNet(nn.Module):
    """A conv torso (converted to float16) and a float32 head, like the UNet's layout."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Linear(4, 1)

    def convert_to_fp16(self):
        self.apply(convert_module_to_f16)

    def forward(self, x):
        h = self.conv(x.to(self.conv.weight.dtype)).float()
        return self.head(h.mean(dim=(2, 3)))


@pytest.fixture(autouse=True)
def _quiet_logger(tmp_path):
    logger.configure(dir=str(tmp_path / "log"), format_strs=["log"])
    yield
    logger.reset()


def _inputs():
    return torch.linspace(-1, 1, 2 * 2 * 5 * 5).reshape(2, 2, 5, 5)


def _loss(model):
    return model(_inputs()).pow(2).mean()


def test_fp16_trainer_keeps_float32_masters_in_two_groups():
    model = TinyNet()
    mpt = MixedPrecisionTrainer(model=model, use_fp16=True)
    assert model.conv.weight.dtype == torch.float16
    assert [p.dtype for p in mpt.master_params] == [torch.float32, torch.float32]
    n_vector = sum(p.numel() for p in model.parameters() if p.ndim <= 1)
    n_matrix = sum(p.numel() for p in model.parameters() if p.ndim > 1)
    assert [tuple(p.shape) for p in mpt.master_params] == [(n_vector,), (1, n_matrix)]


def test_overflow_skips_the_step_and_lowers_the_scale():
    model = TinyNet()
    mpt = MixedPrecisionTrainer(model=model, use_fp16=True)
    opt = torch.optim.AdamW(mpt.master_params, lr=1e-2)
    before = [p.detach().clone() for p in mpt.master_params]
    mpt.zero_grad()
    mpt.backward(_loss(model) * float("inf"))
    assert mpt.optimize(opt) is False
    assert mpt.lg_loss_scale == 19.0
    assert all(torch.equal(a, b) for a, b in zip(before, mpt.master_params))
    assert all(p.grad is None for p in mpt.master_params)


def test_successful_step_grows_the_scale():
    model = TinyNet()
    mpt = MixedPrecisionTrainer(model=model, use_fp16=True, fp16_scale_growth=0.25, initial_lg_loss_scale=4.0)
    opt = torch.optim.SGD(mpt.master_params, lr=0.1)
    mpt.zero_grad()
    mpt.backward(_loss(model))
    assert mpt.optimize(opt) is True
    assert mpt.lg_loss_scale == 4.25


def test_every_master_group_is_unscaled():
    """SGD(lr=1) moves each master by exactly minus its true gradient, in both groups."""
    reference = TinyNet()
    _loss(reference).backward()
    true_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}

    model = TinyNet()
    mpt = MixedPrecisionTrainer(model=model, use_fp16=True, initial_lg_loss_scale=10.0)
    groups = mpt.param_groups_and_shapes
    before = [p.detach().clone() for p in mpt.master_params]
    opt = torch.optim.SGD(mpt.master_params, lr=1.0)
    mpt.zero_grad()
    mpt.backward(_loss(model))
    assert mpt.optimize(opt)
    for master, old, (params, _) in zip(mpt.master_params, before, groups):
        step = (old - master.detach()).reshape(-1)
        expected = torch.cat([true_grads[n].reshape(-1) for n, _ in params])
        torch.testing.assert_close(step, expected, rtol=2e-2, atol=1e-3)


def test_long_run_of_overflows_raises_a_clear_error():
    model = TinyNet()
    mpt = MixedPrecisionTrainer(model=model, use_fp16=True, initial_lg_loss_scale=100.0)
    opt = torch.optim.AdamW(mpt.master_params, lr=1e-3)
    with pytest.raises(TrainingDivergedError, match="overflowed 50 steps in a row.*last checkpoint"):
        for _ in range(60):
            mpt.zero_grad()
            mpt.backward(_loss(model) * float("nan"))
            mpt.optimize(opt)
    assert mpt.consecutive_overflows == 50


def test_scale_below_zero_raises():
    model = TinyNet()
    mpt = MixedPrecisionTrainer(model=model, use_fp16=True, initial_lg_loss_scale=2.0)
    opt = torch.optim.AdamW(mpt.master_params, lr=1e-3)
    with pytest.raises(TrainingDivergedError, match="lg_loss_scale is now -1"):
        for _ in range(5):
            mpt.zero_grad()
            mpt.backward(_loss(model) * float("inf"))
            mpt.optimize(opt)


def test_fp32_norms_match_torch(tmp_path):
    model = TinyNet()
    mpt = MixedPrecisionTrainer(model=model)
    mpt.zero_grad()
    mpt.backward(_loss(model))
    grads = [p.grad for p in model.parameters()]
    expected_grad = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    expected_param = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))
    mpt.optimize(torch.optim.SGD(mpt.master_params, lr=0.0))
    kvs = logger.getkvs()
    assert kvs["grad_norm"] == pytest.approx(expected_grad, rel=1e-6)
    assert kvs["param_norm"] == pytest.approx(expected_param, rel=1e-6)


def test_state_dict_round_trip_through_master_params():
    model = TinyNet()
    groups = get_param_groups_and_shapes(model.named_parameters())
    master = make_master_params(groups)
    with torch.no_grad():
        master[1].add_(1.0)
    sd = master_params_to_state_dict(model, groups, master, use_fp16=True)
    torch.testing.assert_close(sd["conv.weight"], model.conv.weight.detach() + 1.0)
    again = state_dict_to_master_params(model, sd, use_fp16=True)
    assert all(torch.equal(a, b) for a, b in zip(master, again))
