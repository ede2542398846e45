"""Images that sampling starts from: the ``--base_samples`` of super-resolution, the
``--input`` of the editing script.

They come as an npz written by ``image_sample.py`` or as a folder of image
files, and are returned as uint8 NHWC arrays (the form of ``outputs``). Every
problem with the file is a :class:`UsageError` naming the flag to fix.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .errors import UsageError
from .image_datasets import IMAGE_EXTENSIONS, center_crop_arr, class_labels, list_image_files, read_image


def load_base_samples(
    path: str, *, image_size: int, channels: int, class_cond: bool, flag: str = "base_samples",
    size_flag: str = "small_size",
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Low-resolution inputs for super-resolution: ``(uint8 NHWC images, labels or None)``.

    ``path`` is an npz as written by ``image_sample.py`` (``arr_0`` uint8 NHWC,
    ``arr_1`` labels, needed when ``class_cond``) or a folder of images, which
    are centre-cropped and resized to ``image_size``; their labels come from the
    file names as in ``image_datasets`` (text before the first ``_``, classes
    numbered in sorted order). Messages name ``--flag``, and ``--size_flag`` as the
    flag that sets the expected size.
    """
    if not path:
        raise UsageError(f"--{flag} is empty: pass an npz from image_sample.py or a folder of images")
    if os.path.isdir(path):
        images, labels = _load_image_folder(path, image_size, channels, class_cond, flag)
    elif os.path.isfile(path):
        images, labels = _load_npz(path, class_cond, flag)
    else:
        raise UsageError(f"--{flag} {path!r}: no such file or folder")
    expected = (image_size, image_size, channels)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise UsageError(
            f"--{flag} {path!r}: arr_0 has shape {images.shape}, expected N x {image_size} x "
            f"{image_size} x {channels} (NHWC); set --{size_flag} / --in_channels to match the file"
        )
    if images.dtype != np.uint8:
        raise UsageError(
            f"--{flag} {path!r}: arr_0 has dtype {images.dtype}, expected uint8 pixels in 0..255 "
            f"(as written by image_sample.py)"
        )
    if len(images) == 0:
        raise UsageError(f"--{flag} {path!r} holds no images")
    return images, labels


def _load_npz(path: str, class_cond: bool, flag: str):
    """``arr_0`` (and ``arr_1`` as int64 when ``class_cond``) of the npz at ``path``."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UsageError(f"--{flag} {path!r} is not a readable npz file ({err})") from None
    with archive:
        keys = sorted(archive.files)
        if "arr_0" not in keys:
            raise UsageError(
                f"--{flag} {path!r} has keys {keys} but no 'arr_0' (the images); "
                f"save them with np.savez(path, images, labels)"
            )
        images = archive["arr_0"]
        labels = None
        if class_cond:
            if "arr_1" not in keys:
                raise UsageError(
                    f"--{flag} {path!r} has no 'arr_1' labels (keys {keys}) but --class_cond is True; "
                    f"add labels or sample with --class_cond False"
                )
            labels = np.asarray(archive["arr_1"]).astype(np.int64)
            if labels.shape != (len(images),):
                raise UsageError(
                    f"--{flag} {path!r}: arr_1 has shape {labels.shape}, expected ({len(images)},) "
                    f"(one label per image)"
                )
    return images, labels


def _load_image_folder(path: str, image_size: int, channels: int, class_cond: bool, flag: str):
    """The folder's images, centre-cropped to ``image_size``, and their file-name labels."""
    files = list_image_files(path)
    if not files:
        extensions = ", ".join("." + extension for extension in IMAGE_EXTENSIONS)
        raise UsageError(f"--{flag} {path!r} is a folder without images ({extensions})")
    if channels not in (1, 3):
        raise UsageError(f"--in_channels {channels}: image folders give 1 (grayscale) or 3 (RGB) channels")
    images = [
        center_crop_arr(read_image(file, channels), image_size).reshape(image_size, image_size, channels)
        for file in files
    ]
    labels = np.array(class_labels(files), dtype=np.int64) if class_cond else None
    return np.stack(images).astype(np.uint8), labels
