"""Specifications of guided_diffusion.resample."""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.resample import (
    LossAwareSampler,
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)

T = 8


def diffusion(steps=T):
    return gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule("cosine", steps),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE,
    )


def warm_up(sampler, loss_of_t, rounds):
    for _ in range(rounds):
        sampler.update_with_all_losses(list(range(T)), [loss_of_t(t) for t in range(T)])


def test_named_samplers_and_their_classes():
    assert isinstance(create_named_schedule_sampler("uniform", diffusion()), UniformSampler)
    lsm = create_named_schedule_sampler("loss-second-moment", diffusion())
    assert isinstance(lsm, LossSecondMomentResampler) and isinstance(lsm, LossAwareSampler)
    assert isinstance(lsm, ScheduleSampler)


def test_unknown_sampler_names_the_flag():
    with pytest.raises(NotImplementedError, match="--schedule_sampler"):
        create_named_schedule_sampler("foo", diffusion())


def test_uniform_sample_has_unit_weights_and_valid_indices():
    np.random.seed(0)
    idx, w = UniformSampler(diffusion()).sample(64, torch.device("cpu"))
    assert idx.dtype == torch.int64 and w.dtype == torch.float32
    assert idx.min() >= 0 and idx.max() < T and torch.all(w == 1)


def test_sampling_uses_the_global_numpy_generator():
    s = UniformSampler(diffusion())
    np.random.seed(4)
    a, _ = s.sample(16, "cpu")
    np.random.seed(4)
    b, _ = s.sample(16, "cpu")
    assert torch.equal(a, b)


def test_second_moment_weights_are_uniform_before_warm_up():
    s = LossSecondMomentResampler(diffusion(), history_per_term=3)
    warm_up(s, lambda t: 1.0 + t, rounds=2)
    assert np.array_equal(s.weights(), np.ones(T))


def test_second_moment_weights_sum_to_one_and_favour_high_loss_steps():
    s = LossSecondMomentResampler(diffusion(), history_per_term=3, uniform_prob=0.01)
    warm_up(s, lambda t: 0.1 * (t + 1), rounds=3)
    w = s.weights()
    assert abs(w.sum() - 1.0) < 1e-12
    assert np.all(np.diff(w) > 0)
    assert w.min() >= 0.01 / T


def test_history_keeps_only_the_latest_losses():
    s = LossSecondMomentResampler(diffusion(), history_per_term=2, uniform_prob=0.0)
    warm_up(s, lambda t: 100.0, rounds=2)
    warm_up(s, lambda t: 1.0 if t == 0 else 2.0, rounds=2)
    w = s.weights()
    np.testing.assert_allclose(w[1:] / w[0], 2.0)


def test_importance_weights_undo_the_sampling_bias():
    s = LossSecondMomentResampler(diffusion(), history_per_term=1, uniform_prob=0.0)
    warm_up(s, lambda t: float(t + 1), rounds=1)
    np.random.seed(1)
    idx, w = s.sample(4000, "cpu")
    p = s.weights() / s.weights().sum()
    np.testing.assert_allclose(w.numpy(), 1 / (T * p[idx.numpy()]), rtol=1e-6)
    assert abs(w.double().mean().item() - 1.0) < 0.05


def test_local_losses_update_in_a_plain_process():
    s = LossSecondMomentResampler(diffusion(), history_per_term=1)
    s.update_with_local_losses(torch.arange(T), torch.arange(T, dtype=torch.float32) + 1)
    assert s._warmed_up()
    np.testing.assert_allclose(s._loss_history[:, 0], np.arange(T) + 1)


def _gather_worker(rank, world, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        s = LossSecondMomentResampler(diffusion(), history_per_term=2)
        # Ranks hold different batch sizes: rank 0 has steps 0..4, rank 1 has 5..7.
        ts = torch.arange(0, 5) if rank == 0 else torch.arange(5, T)
        s.update_with_local_losses(ts, ts.float() * 10 + rank)
        np.save(os.path.join(result_dir, f"history{rank}.npy"), s._loss_history)
        np.save(os.path.join(result_dir, f"counts{rank}.npy"), s._loss_counts)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_local_losses_are_gathered_across_ranks_with_uneven_batches():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gather_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        histories = [np.load(os.path.join(tmp, f"history{r}.npy")) for r in range(2)]
        counts = [np.load(os.path.join(tmp, f"counts{r}.npy")) for r in range(2)]
    expected = np.array([t * 10 + (0 if t < 5 else 1) for t in range(T)], dtype=np.float64)
    for history, count in zip(histories, counts):
        np.testing.assert_array_equal(count, np.ones(T))
        np.testing.assert_array_equal(history[:, 0], expected)
