"""Specifications of guided_diffusion.nn beyond the golden fixtures."""

import math

import numpy as np
import pytest
import torch

from guided_diffusion import nn as gnn


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_timestep_embedding_is_cosines_then_sines_of_geometric_frequencies():
    t = torch.tensor([0, 3, 250])
    dim, period = 8, 10000
    emb = gnn.timestep_embedding(t, dim, max_period=period).double()
    freqs = np.exp(-math.log(period) * np.arange(dim // 2) / (dim // 2))
    args = t.double().numpy()[:, None] * freqs[None]
    np.testing.assert_allclose(emb[:, : dim // 2].numpy(), np.cos(args), atol=1e-4)
    np.testing.assert_allclose(emb[:, dim // 2 :].numpy(), np.sin(args), atol=1e-4)
    assert emb.dtype == torch.float64 and gnn.timestep_embedding(t, dim).dtype == torch.float32


def test_timestep_embedding_odd_dim_ends_with_a_zero_column():
    emb = gnn.timestep_embedding(torch.tensor([1.5, 7.0]), 5)
    assert emb.shape == (2, 5)
    assert torch.all(emb[:, -1] == 0)
    assert torch.equal(emb[:, :4], gnn.timestep_embedding(torch.tensor([1.5, 7.0]), 4))


def test_timestep_embedding_accepts_fractional_timesteps_between_integers():
    whole = gnn.timestep_embedding(torch.tensor([12, 13]), 16)
    frac = gnn.timestep_embedding(torch.tensor([12.0, 12.5, 13.0]), 16)
    assert torch.equal(frac[0], whole[0]) and torch.equal(frac[2], whole[1])
    assert not torch.equal(frac[1], whole[0]) and not torch.equal(frac[1], whole[1])


def test_groupnorm32_normalises_in_float32_and_returns_input_dtype():
    torch.manual_seed(0)
    gn = gnn.normalization(64)
    x = torch.randn(2, 64, 3, 3) * 3 + 1
    out16 = gn(x.half())
    assert out16.dtype == torch.float16
    ref = torch.nn.functional.group_norm(x.half().float(), 32, gn.weight, gn.bias, gn.eps)
    assert torch.equal(out16, ref.half())


def test_normalization_rejects_channels_not_divisible_by_32():
    with pytest.raises(ValueError, match="multiple of 32.*got 48"):
        gnn.normalization(48)


@pytest.mark.parametrize("factory", [gnn.conv_nd, gnn.avg_pool_nd])
def test_nd_factories_name_the_bad_dims(factory):
    with pytest.raises(ValueError, match="dims=4"):
        factory(4, 2, 2)


def test_mean_flat_averages_all_but_the_batch_dimension():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(gnn.mean_flat(x), torch.tensor([5.5, 17.5]))
    assert gnn.mean_flat(torch.tensor([1.0, 2.0, 6.0])).shape == ()


def test_update_ema_moves_targets_towards_sources_in_place():
    targ = [torch.nn.Parameter(torch.tensor([1.0, 2.0]))]
    src = [torch.tensor([3.0, -2.0])]
    gnn.update_ema(targ, src, rate=0.75)
    assert torch.allclose(targ[0].detach(), torch.tensor([1.5, 1.0]))
    assert not targ[0].grad_fn


def test_zero_and_scale_module_change_parameters_in_place():
    lin = torch.nn.Linear(3, 2)
    w = lin.weight.detach().clone()
    assert gnn.scale_module(lin, -2.0) is lin
    assert torch.equal(lin.weight.detach(), -2.0 * w)
    assert gnn.zero_module(lin) is lin
    assert all(torch.count_nonzero(p) == 0 for p in lin.parameters())


def _dropout_func(lin):
    drop = torch.nn.Dropout(0.5)
    return lambda a, b: drop(lin(a).tanh()) * b


def _run_checkpoint(flag, lin, seed=3):
    x = torch.linspace(-1, 1, 18).reshape(3, 6).requires_grad_(True)
    y = torch.linspace(2, 0, 18).reshape(3, 6).requires_grad_(True)
    lin.zero_grad()
    torch.manual_seed(seed)
    out = gnn.checkpoint(_dropout_func(lin), (x, y), list(lin.parameters()), flag)
    out.square().sum().backward()
    grads = [x.grad, y.grad] + [p.grad for p in lin.parameters() if p.requires_grad]
    return out.detach(), grads


def test_checkpoint_with_dropout_gives_the_plain_outputs_and_gradients():
    torch.manual_seed(1)
    lin = torch.nn.Linear(6, 6)
    out_plain, g_plain = _run_checkpoint(False, lin)
    out_ckpt, g_ckpt = _run_checkpoint(True, lin)
    assert torch.count_nonzero(out_plain == 0) > 0  # dropout really dropped something
    assert torch.equal(out_plain, out_ckpt)
    for a, b in zip(g_plain, g_ckpt):
        assert torch.equal(a, b)


def test_checkpoint_through_frozen_parameters_gives_input_gradients():
    torch.manual_seed(1)
    lin = torch.nn.Linear(6, 6).requires_grad_(False)
    out_plain, g_plain = _run_checkpoint(False, lin)
    out_ckpt, g_ckpt = _run_checkpoint(True, lin)
    assert len(g_ckpt) == 2 and all(g is not None for g in g_ckpt)
    for a, b in zip(g_plain, g_ckpt):
        assert torch.equal(a, b)
