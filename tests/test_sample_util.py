"""Specifications of guided_diffusion.sample_util: batching, seeds, conversions, outputs, inputs."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import sample_util
from guided_diffusion.sample_util import UsageError

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


# ------------------------------------------------------------------ conversions and labels


def test_to_uint8_images_maps_range_and_layout_like_the_original():
    sample = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 2, 3).repeat(2, 3, 1, 1)
    out = sample_util.to_uint8_images(sample)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3, 3)
    # (x + 1) * 127.5, clamped, truncated: 0, 0, 127, 254, 255, 255
    assert out[0, :, :, 0].ravel().tolist() == [0, 0, 127, 254, 255, 255]


def test_from_uint8_images_inverts_to_uint8_images_on_the_pixel_grid():
    pixels = np.random.RandomState(0).randint(0, 256, size=(2, 4, 4, 3)).astype(np.uint8)
    tensor = sample_util.from_uint8_images(pixels)
    assert tensor.shape == (2, 3, 4, 4) and tensor.min() >= -1 and tensor.max() <= 1
    # nudge up by half a level so truncation lands on the same integer
    np.testing.assert_array_equal(sample_util.to_uint8_images(tensor + 0.5 / 127.5), pixels)


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


@pytest.mark.parametrize("label,classes", [(10, 10), (-2, 10)])
def test_check_class_label_names_the_flag(label, classes):
    with pytest.raises(UsageError, match=f"--class_label {label}"):
        sample_util.check_class_label(label, classes)


def test_check_positive_rejects_zero_with_the_flag_and_value():
    with pytest.raises(UsageError, match="--num_samples must be a positive number, got 0"):
        sample_util.check_positive("num_samples", 0, 16)


def test_check_respacing_explains_an_impossible_respacing():
    sample_util.check_respacing(100, "ddim10")
    with pytest.raises(UsageError, match="--timestep_respacing 'ddim7'.*--diffusion_steps 10"):
        sample_util.check_respacing(10, "ddim7")
    with pytest.raises(UsageError, match="--timestep_respacing '20'"):
        sample_util.check_respacing(10, "20")


# ------------------------------------------------------------------ classifier guidance


class _LinearClassifier(torch.nn.Module):
    """logits = W x.flatten() + t-dependent bias: tiny, with a known gradient."""

    def __init__(self, pixels, classes):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(classes, pixels, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, t):
        return x.flatten(1) @ self.weight.t() + t.float()[:, None] * 0.01


def test_classifier_cond_fn_is_scaled_gradient_of_log_softmax():
    classifier = _LinearClassifier(12, 4)
    x = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 5, 9])
    y = torch.tensor([0, 3, 1])
    grad = sample_util.classifier_cond_fn(classifier, 2.5)(x, t, y=y)
    # d/dx log softmax(Wx)[y] = W[y] - sum_c p_c W[c]
    probs = torch.softmax(classifier(x, t), dim=-1).detach()
    w = classifier.weight.detach()
    expected = (w[y] - probs @ w).view_as(x) * 2.5
    torch.testing.assert_close(grad, expected)
    assert not x.requires_grad


def test_classifier_cond_fn_with_scale_zero_is_zero():
    grad = sample_util.classifier_cond_fn(_LinearClassifier(12, 4), 0.0)(
        torch.randn(2, 3, 2, 2), torch.tensor([1, 2]), y=torch.tensor([0, 1])
    )
    assert torch.count_nonzero(grad) == 0


def test_classifier_cond_fn_without_labels_says_so():
    with pytest.raises(ValueError, match="needs labels"):
        sample_util.classifier_cond_fn(_LinearClassifier(12, 4), 1.0)(torch.randn(1, 3, 2, 2), torch.tensor([0]))


# ------------------------------------------------------------------ outputs


def test_save_samples_writes_npz_grid_and_pngs(tmp_path):
    images = np.random.RandomState(0).randint(0, 256, size=(5, 4, 4, 3)).astype(np.uint8)
    labels = np.array([1, 2, 3, 4, 0])
    path = sample_util.save_samples(images, labels, str(tmp_path), save_png=True)
    assert path == os.path.abspath(tmp_path / "samples_5x4x4x3.npz")
    with np.load(path) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(npz["arr_0"], images)
        np.testing.assert_array_equal(npz["arr_1"], labels)
    grid = np.array(Image.open(tmp_path / "samples_5x4x4x3.png"))
    assert grid.shape == (8, 12, 3)  # 3 columns x 2 rows
    np.testing.assert_array_equal(grid[4:8, 0:4], images[3])
    pngs = sorted(os.listdir(tmp_path / "samples"))
    assert pngs == ["000000_1.png", "000001_2.png", "000002_3.png", "000003_4.png", "000004_0.png"]
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "samples" / pngs[2])), images[2])
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_save_samples_grayscale_without_labels(tmp_path):
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 1)
    path = sample_util.save_samples(images, None, str(tmp_path), save_png=True)
    with np.load(path) as npz:
        assert npz.files == ["arr_0"]
    assert os.path.basename(path) == "samples_2x3x3x1.npz"
    single = np.array(Image.open(tmp_path / "samples" / "000001.png"))
    np.testing.assert_array_equal(single, images[1, :, :, 0])


def test_image_grid_caps_the_number_of_images():
    grid = sample_util.image_grid(np.zeros((100, 2, 2, 3), np.uint8), max_images=9)
    assert grid.shape == (6, 6, 3)


# ------------------------------------------------------------------ base samples


def _npz(tmp_path, **arrays):
    path = tmp_path / "base.npz"
    np.savez(path, **arrays)
    return str(path)


def test_load_base_samples_reads_images_and_labels(tmp_path):
    images = np.random.RandomState(1).randint(0, 256, size=(3, 8, 8, 3)).astype(np.uint8)
    got, labels = sample_util.load_base_samples(
        _npz(tmp_path, arr_0=images, arr_1=np.array([4, 5, 6])), image_size=8, channels=3, class_cond=True
    )
    np.testing.assert_array_equal(got, images)
    assert labels.tolist() == [4, 5, 6] and labels.dtype == np.int64


def test_load_base_samples_without_arr_0_names_the_keys(tmp_path):
    with pytest.raises(UsageError, match=r"keys \['images'\] but no 'arr_0'"):
        sample_util.load_base_samples(
            _npz(tmp_path, images=np.zeros((1, 8, 8, 3), np.uint8)), image_size=8, channels=3, class_cond=False
        )


def test_load_base_samples_rejects_a_wrong_shape_naming_the_flags(tmp_path):
    path = _npz(tmp_path, arr_0=np.zeros((2, 3, 8, 8), np.uint8))  # NCHW by mistake
    with pytest.raises(UsageError, match=r"shape \(2, 3, 8, 8\), expected N x 8 x 8 x 3.*--small_size"):
        sample_util.load_base_samples(path, image_size=8, channels=3, class_cond=False)


def test_load_base_samples_rejects_float_pixels(tmp_path):
    path = _npz(tmp_path, arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(UsageError, match="dtype float32, expected uint8"):
        sample_util.load_base_samples(path, image_size=8, channels=3, class_cond=False)


def test_load_base_samples_needs_labels_for_class_cond(tmp_path):
    path = _npz(tmp_path, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(UsageError, match="no 'arr_1' labels.*--class_cond"):
        sample_util.load_base_samples(path, image_size=8, channels=3, class_cond=True)


def test_load_base_samples_missing_path(tmp_path):
    with pytest.raises(UsageError, match="no such file or folder"):
        sample_util.load_base_samples(str(tmp_path / "nope.npz"), image_size=8, channels=3, class_cond=False)


def test_load_base_samples_from_a_folder_resizes_and_labels(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.RandomState(2)
    for name in ["dog_1.png", "cat_1.png", "cat_2.png"]:
        Image.fromarray(rng.randint(0, 256, size=(16, 16, 3)).astype(np.uint8)).save(folder / name)
    images, labels = sample_util.load_base_samples(str(folder), image_size=8, channels=3, class_cond=True)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 1]  # cat_1, cat_2, dog_1 (sorted; cat=0, dog=1)
    gray, _ = sample_util.load_base_samples(str(folder), image_size=8, channels=1, class_cond=False)
    assert gray.shape == (3, 8, 8, 1)


def test_load_base_samples_from_an_empty_folder(tmp_path):
    with pytest.raises(UsageError, match="folder without images"):
        sample_util.load_base_samples(str(tmp_path), image_size=8, channels=3, class_cond=False)
