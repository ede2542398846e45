"""Specifications of guided_diffusion.outputs: sample conversions, the npz, the PNG grid and PNGs."""

import os

import numpy as np
import torch
from PIL import Image

from guided_diffusion import outputs

torch.set_num_threads(1)


def test_to_uint8_images_maps_range_and_layout_like_the_original():
    sample = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 2, 3).repeat(2, 3, 1, 1)
    out = outputs.to_uint8_images(sample)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3, 3)
    # (x + 1) * 127.5, clamped, truncated: 0, 0, 127, 254, 255, 255
    assert out[0, :, :, 0].ravel().tolist() == [0, 0, 127, 254, 255, 255]


def test_from_uint8_images_inverts_to_uint8_images_on_the_pixel_grid():
    pixels = np.random.RandomState(0).randint(0, 256, size=(2, 4, 4, 3)).astype(np.uint8)
    tensor = outputs.from_uint8_images(pixels)
    assert tensor.shape == (2, 3, 4, 4) and tensor.min() >= -1 and tensor.max() <= 1
    # nudge up by half a level so truncation lands on the same integer
    np.testing.assert_array_equal(outputs.to_uint8_images(tensor + 0.5 / 127.5), pixels)


def test_save_samples_writes_npz_grid_and_pngs(tmp_path):
    images = np.random.RandomState(0).randint(0, 256, size=(5, 4, 4, 3)).astype(np.uint8)
    labels = np.array([1, 2, 3, 4, 0])
    path = outputs.save_samples(images, labels, str(tmp_path), save_png=True)
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
    path = outputs.save_samples(images, None, str(tmp_path), save_png=True)
    with np.load(path) as npz:
        assert npz.files == ["arr_0"]
    assert os.path.basename(path) == "samples_2x3x3x1.npz"
    single = np.array(Image.open(tmp_path / "samples" / "000001.png"))
    np.testing.assert_array_equal(single, images[1, :, :, 0])


def test_image_grid_caps_the_number_of_images():
    grid = outputs.image_grid(np.zeros((100, 2, 2, 3), np.uint8), max_images=9)
    assert grid.shape == (6, 6, 3)
