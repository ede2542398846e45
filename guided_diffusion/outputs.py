"""What the sampling scripts write: uint8 NHWC samples as an npz, a PNG grid and PNGs.

Samples leave the model as NCHW floats in [-1, 1] and are stored as the
original stores them: uint8 NHWC ``arr_0`` (labels in ``arr_1``) in
``samples_{N}x{H}x{W}x{C}.npz``. This module converts between the two forms
and writes the files; it knows nothing of flags or ranks.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_savez

GRID_MAX_IMAGES = 64  # the PNG grid beside the npz shows at most this many images


def to_uint8_images(sample: torch.Tensor) -> np.ndarray:
    """NCHW floats in [-1, 1] -> NHWC uint8, rounding down as the original does."""
    sample = ((sample + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return sample.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def from_uint8_images(images: np.ndarray) -> torch.Tensor:
    """NHWC uint8 -> NCHW float32 in [-1, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1.0
    return tensor.permute(0, 3, 1, 2).contiguous()


def samples_file_name(images: np.ndarray, prefix: str = "samples") -> str:
    """``samples_{N}x{H}x{W}x{C}.npz`` as the original names it (another ``prefix`` for other arrays)."""
    return f"{prefix}_" + "x".join(str(d) for d in images.shape) + ".npz"


def image_grid(images: np.ndarray, max_images: int = GRID_MAX_IMAGES) -> np.ndarray:
    """Tile up to ``max_images`` NHWC images into one HWC array, rows of ceil(sqrt(n))."""
    images = images[:max_images]
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return grid


def to_pil(image: np.ndarray) -> Image.Image:
    """An HWC uint8 array as a PIL image (grayscale when it has one channel)."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def save_samples(images: np.ndarray, labels: Optional[np.ndarray], out_dir: str, *, save_png: bool = False) -> str:
    """Write the samples npz (``arr_0`` images, ``arr_1`` labels), its PNG grid, and PNGs.

    Returns the absolute path of the npz. With ``save_png`` each image also goes
    to ``<out_dir>/samples/{index:06d}.png`` (``_{label}`` appended when labelled).
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(out_dir, samples_file_name(images)))
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = labels
    atomic_savez(path, **arrays)
    to_pil(image_grid(images)).save(path[: -len(".npz")] + ".png")
    if save_png:
        png_dir = os.path.join(out_dir, "samples")
        os.makedirs(png_dir, exist_ok=True)
        for i, image in enumerate(images):
            suffix = "" if labels is None else f"_{int(labels[i])}"
            to_pil(image).save(os.path.join(png_dir, f"{i:06d}{suffix}.png"))
    return path
