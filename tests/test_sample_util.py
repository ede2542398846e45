"""Specifications of guided_diffusion.sample_util: batches over ranks, seeds, labels."""

import numpy as np
import pytest
import torch

from guided_diffusion import sample_util
from guided_diffusion.errors import UsageError

torch.set_num_threads(1)


# ------------------------------------------------------------------ batching and seeds


@pytest.mark.parametrize("num_samples,batch_size", [(10, 4), (8, 4), (3, 16), (1, 1)])
def test_batch_sizes_add_up_to_exactly_num_samples(num_samples, batch_size):
    sizes = sample_util.batch_sizes(num_samples, batch_size)
    assert sum(sizes) == num_samples
    assert all(0 < s <= batch_size for s in sizes)
    assert sizes[:-1] == [batch_size] * (len(sizes) - 1)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_rank_shares_cover_every_item_once(world):
    shares = [sample_util.rank_share(11, rank, world) for rank in range(world)]
    assert sum(shares) == 11
    assert max(shares) - min(shares) <= 1


def test_derived_seeds_are_stable_and_distinct_per_stream():
    assert sample_util.derived_seed(5, 0) == sample_util.derived_seed(5, 0)
    seeds = {sample_util.derived_seed(5, k) for k in range(100)}
    assert len(seeds) == 100
    assert sample_util.derived_seed(5, 0) != sample_util.derived_seed(6, 0)
    assert sample_util.derived_seed(5, 0, 1) != sample_util.derived_seed(5, 0)


def test_resolve_seed_keeps_a_given_seed_and_rejects_negative_ones():
    assert sample_util.resolve_seed(7) == 7
    assert 0 <= sample_util.resolve_seed(None) < 2**32
    with pytest.raises(UsageError, match="--seed"):
        sample_util.resolve_seed(-1)


def test_sample_in_batches_returns_batches_in_order_with_exact_count():
    calls = []

    def make_batch(index, size):
        calls.append((index, size))
        images = np.full((size, 2, 2, 1), index, dtype=np.uint8)
        return images, np.arange(size, dtype=np.int64) + 10 * index

    images, labels = sample_util.sample_in_batches(
        make_batch, num_samples=7, batch_size=3, image_shape=(2, 2, 1), with_labels=True
    )
    assert calls == [(0, 3), (1, 3), (2, 1)]
    assert images.shape == (7, 2, 2, 1)
    assert images[:, 0, 0, 0].tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert labels.tolist() == [0, 1, 2, 10, 11, 12, 20]


def test_sample_in_batches_without_labels_returns_none():
    images, labels = sample_util.sample_in_batches(
        lambda k, n: (np.zeros((n, 1, 1, 3), np.uint8), None),
        num_samples=2, batch_size=2, image_shape=(1, 1, 3), with_labels=False,
    )
    assert images.shape == (2, 1, 1, 3) and labels is None


# ------------------------------------------------------------------ labels


def test_draw_labels_fixed_class_or_seeded_uniform():
    assert sample_util.draw_labels(0, 5, 10, class_label=3).tolist() == [3] * 5
    a = sample_util.draw_labels(1, 200, 10)
    assert a.dtype == torch.int64 and a.min() >= 0 and a.max() < 10 and len(set(a.tolist())) == 10
    assert torch.equal(a, sample_util.draw_labels(1, 200, 10))
    assert not torch.equal(a, sample_util.draw_labels(2, 200, 10))


def test_draw_labels_leaves_the_global_generator_alone():
    torch.manual_seed(0)
    expected = torch.randn(3)
    torch.manual_seed(0)
    sample_util.draw_labels(4, 8, 10)
    assert torch.equal(torch.randn(3), expected)
