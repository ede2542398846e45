"""Specifications of guided_diffusion.inputs: reading --base_samples from an npz or a folder."""

import numpy as np
import pytest
from PIL import Image

from guided_diffusion import inputs
from guided_diffusion.errors import UsageError


def _npz(tmp_path, **arrays):
    path = tmp_path / "base.npz"
    np.savez(path, **arrays)
    return str(path)


def test_load_base_samples_reads_images_and_labels(tmp_path):
    images = np.random.RandomState(1).randint(0, 256, size=(3, 8, 8, 3)).astype(np.uint8)
    got, labels = inputs.load_base_samples(
        _npz(tmp_path, arr_0=images, arr_1=np.array([4, 5, 6])), image_size=8, channels=3, class_cond=True
    )
    np.testing.assert_array_equal(got, images)
    assert labels.tolist() == [4, 5, 6] and labels.dtype == np.int64


def test_load_base_samples_without_arr_0_names_the_keys(tmp_path):
    with pytest.raises(UsageError, match=r"keys \['images'\] but no 'arr_0'"):
        inputs.load_base_samples(
            _npz(tmp_path, images=np.zeros((1, 8, 8, 3), np.uint8)), image_size=8, channels=3, class_cond=False
        )


def test_load_base_samples_rejects_a_wrong_shape_naming_the_flags(tmp_path):
    path = _npz(tmp_path, arr_0=np.zeros((2, 3, 8, 8), np.uint8))  # NCHW by mistake
    with pytest.raises(UsageError, match=r"shape \(2, 3, 8, 8\), expected N x 8 x 8 x 3.*--small_size"):
        inputs.load_base_samples(path, image_size=8, channels=3, class_cond=False)


def test_load_base_samples_rejects_float_pixels(tmp_path):
    path = _npz(tmp_path, arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(UsageError, match="dtype float32, expected uint8"):
        inputs.load_base_samples(path, image_size=8, channels=3, class_cond=False)


def test_load_base_samples_needs_labels_for_class_cond(tmp_path):
    path = _npz(tmp_path, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(UsageError, match="no 'arr_1' labels.*--class_cond"):
        inputs.load_base_samples(path, image_size=8, channels=3, class_cond=True)


def test_load_base_samples_missing_path(tmp_path):
    with pytest.raises(UsageError, match="no such file or folder"):
        inputs.load_base_samples(str(tmp_path / "nope.npz"), image_size=8, channels=3, class_cond=False)


def test_load_base_samples_from_a_folder_resizes_and_labels(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.RandomState(2)
    for name in ["dog_1.png", "cat_1.png", "cat_2.png"]:
        Image.fromarray(rng.randint(0, 256, size=(16, 16, 3)).astype(np.uint8)).save(folder / name)
    images, labels = inputs.load_base_samples(str(folder), image_size=8, channels=3, class_cond=True)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 1]  # cat_1, cat_2, dog_1 (sorted; cat=0, dog=1)
    gray, _ = inputs.load_base_samples(str(folder), image_size=8, channels=1, class_cond=False)
    assert gray.shape == (3, 8, 8, 1)


def test_load_base_samples_from_an_empty_folder(tmp_path):
    with pytest.raises(UsageError, match="folder without images"):
        inputs.load_base_samples(str(tmp_path), image_size=8, channels=3, class_cond=False)
