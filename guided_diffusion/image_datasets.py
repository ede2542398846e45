"""Image-folder datasets for training and evaluating diffusion models.

``load_data`` turns a folder of images into an endless stream of batches
``(x, cond)``: ``x`` is a float32 NCHW tensor in [-1, 1] and ``cond`` is
``{"y": int64 labels}`` for class-conditional data, else ``{}``.

Behaviour shared with OpenAI's original:

* files ending in ``.jpg .jpeg .png .gif`` (any letter case) are collected
  recursively, in sorted order within each folder;
* the class of a file is its name before the first ``_`` (``cat_001.png`` ->
  ``cat``); class names are numbered in sorted order;
* every process reads its own shard (files ``rank, rank + world, ...``), with
  the rank and world size of ``torch.distributed``, else of the launcher;
* images are resized so the shorter side fits (BOX halvings, then one
  BICUBIC resize) and centre-cropped, or randomly cropped with
  ``random_crop``; ``random_flip`` mirrors half of them;
* a ``DataLoader`` with ``drop_last=True``, shuffled unless ``deterministic``,
  with one worker process by default (whose python ``random`` is seeded from
  torch's RNG, so a ``torch.manual_seed`` fixes the crops and flips).

Beyond the original:

* 16-bit images are scaled to 8 bits (not clipped at 255); images with
  transparency (RGBA, LA, palette with a transparent colour) are composited
  onto a white background instead of having their colour under transparent
  pixels exposed;
* ``in_channels=1`` gives one-channel grayscale batches;
* clear errors for a missing or empty folder, a shard smaller than the batch,
  and unreadable images (``skip_bad_images=True`` skips those with a warning).
"""

import math
import multiprocessing
import numbers
import os
import random
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from . import dist_util
from .errors import usage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")

_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class BadImageError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, not an image): the user's
    data to fix, so the scripts report it as one ``error:`` line (exit status 2)."""

    usage_error = True


# ----------------------------------------------------------------------------- files


def _is_remote(path):
    return "://" in path


def _folder_entries(folder):
    """``(name, path, is_dir)`` for each entry of ``folder``, sorted by name.

    Local folders use ``os.scandir``, whose cached file types spare one ``stat``
    per file on large datasets; ``gs://``-style paths go through blobfile.
    """
    if _is_remote(folder):
        import blobfile

        paths = ((name, blobfile.join(folder, name)) for name in blobfile.listdir(folder))
        return sorted((name, path, blobfile.isdir(path)) for name, path in paths)
    with os.scandir(folder) as entries:
        return sorted((e.name, os.path.join(folder, e.name), e.is_dir()) for e in entries)


def _isdir(path):
    if _is_remote(path):
        import blobfile

        return blobfile.isdir(path)
    return os.path.isdir(path)


def _open_binary(path):
    if _is_remote(path):
        import blobfile

        return blobfile.BlobFile(path, "rb")
    return open(path, "rb")


def _has_image_extension(name):
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


def _list_image_files_recursively(data_dir):
    """Image files under ``data_dir``, depth first, sorted by name within each folder."""
    found = []
    for name, path, is_dir in _folder_entries(data_dir):
        if is_dir:
            found.extend(_list_image_files_recursively(path))
        elif _has_image_extension(name):
            found.append(path)
    return found


list_image_files = _list_image_files_recursively


def class_labels(paths):
    """Integer labels from file-name prefixes: ``cat_001.png`` has class ``cat``;
    the distinct class names are numbered in sorted order."""
    names = [os.path.basename(path).split("_")[0] for path in paths]
    index = {name: i for i, name in enumerate(sorted(set(names)))}
    return [index[name] for name in names]


# ----------------------------------------------------------------------------- pixels


def _to_eight_bit(image):
    """16-bit grayscale to 8-bit 'L' by keeping the high byte, as Pillow reads 16-bit colour
    PNGs (Pillow's own conversion would clip everything above 255 to white)."""
    wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    return Image.fromarray((wide >> 8).astype(np.uint8), "L")


def _has_transparency(image):
    return "A" in image.getbands() or "transparency" in image.info


def convert_image(image, in_channels=3):
    """Return ``image`` as 8-bit 'RGB' (``in_channels=3``) or 'L' (``in_channels=1``).

    16-bit images are scaled down to 8 bits; transparent pixels are composited
    onto white.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _to_eight_bit(image)
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if _has_transparency(image):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB" if in_channels == 3 else "L")


def read_image(path, in_channels=3):
    """Decode the image file ``path`` fully and convert it (see ``convert_image``)."""
    try:
        with _open_binary(path) as f:
            image = Image.open(f)
            image.load()
        return convert_image(image, in_channels)
    except _READ_ERRORS as err:
        raise BadImageError(
            f"cannot read image file {path}: {err}. Replace or delete it, or pass "
            "--skip_bad_images True (load_data(skip_bad_images=True)) to skip unreadable files."
        ) from err


def _halve_while_large(pil_image, side):
    """BOX-downsample by 2 while the shorter side is at least ``2 * side`` (cheap antialiasing)."""
    while min(*pil_image.size) >= 2 * side:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.Resampling.BOX)
    return pil_image


def _fit_shorter_side(pil_image, side):
    """Resize so the shorter side is ``side`` pixels: BOX halvings, then one BICUBIC resize."""
    pil_image = _halve_while_large(pil_image, side)
    scale = side / min(*pil_image.size)
    size = tuple(round(s * scale) for s in pil_image.size)
    return pil_image.resize(size, resample=Image.Resampling.BICUBIC)


def _crop(arr, top, left, image_size):
    return arr[top : top + image_size, left : left + image_size]


def center_crop_arr(pil_image, image_size):
    """Fit the shorter side to ``image_size`` and cut the central square (HWC uint8 array)."""
    arr = np.array(_fit_shorter_side(pil_image, image_size))
    return _crop(arr, (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2, image_size)


def random_crop_arr(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0):
    """Random square crop covering a ``min_crop_frac..max_crop_frac`` fraction of the
    shorter side, resized to ``image_size`` (uses python ``random``: three draws)."""
    shortest = math.ceil(image_size / max_crop_frac)
    longest = math.ceil(image_size / min_crop_frac)
    arr = np.array(_fit_shorter_side(pil_image, random.randrange(shortest, longest + 1)))
    top = random.randrange(arr.shape[0] - image_size + 1)
    left = random.randrange(arr.shape[1] - image_size + 1)
    return _crop(arr, top, left, image_size)


# ----------------------------------------------------------------------------- dataset


class ImageDataset:
    """A map-style dataset over one shard of ``image_paths``.

    Item ``i`` is ``(CHW float32 array in [-1, 1], {"y": int64} or {})``.
    The shard is ``image_paths[shard::num_shards]``.
    """

    def __init__(
        self,
        resolution,             # side of the square output images
        image_paths,            # every image file, the same list on every shard
        classes=None,           # integer label per path, or None for unconditional data
        shard=0,                # this process's shard index
        num_shards=1,           # number of shards (processes)
        random_crop=False,      # random crops instead of centre crops
        random_flip=True,       # mirror half of the images
        *,
        skip_bad_images=False,  # replace unreadable files by the next readable one, with a warning
        in_channels=3,          # 3: RGB, 1: grayscale
    ):
        if in_channels not in (1, 3):
            raise usage(ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels!r}"))
        self.resolution = resolution
        self.local_images = list(image_paths)[shard:][::num_shards]
        self.local_classes = None if classes is None else list(classes)[shard:][::num_shards]
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.skip_bad_images = skip_bad_images
        self.in_channels = in_channels
        # Indices found unreadable (with skip_bad_images), in shared memory: DataLoader workers are forked
        # anew each epoch, and each file is reported once per run, not once per worker and epoch.
        self._bad = multiprocessing.RawArray("b", len(self.local_images)) if skip_bad_images else None

    def __len__(self):
        return len(self.local_images)

    def __getitem__(self, idx):
        if not self.skip_bad_images:
            return self._make_item(read_image(self.local_images[idx], self.in_channels), idx)
        count = len(self.local_images)
        for index in ((idx + offset) % count for offset in range(count)):
            if self._bad[index]:
                continue
            try:
                image = read_image(self.local_images[index], self.in_channels)
            except BadImageError as err:
                self._bad[index] = 1
                warnings.warn(f"skipping unreadable image {self.local_images[index]} ({err.__cause__})")
                continue
            return self._make_item(image, index)
        raise BadImageError(
            f"none of the {count} images of this shard could be read (the first is {self.local_images[0]}); "
            "check --data_dir"
        )

    def _make_item(self, image, index):
        if self.random_crop:
            arr = random_crop_arr(image, self.resolution)
        else:
            arr = center_crop_arr(image, self.resolution)
        if self.random_flip and random.random() < 0.5:
            arr = arr[:, ::-1]
        arr = arr.astype(np.float32) / 127.5 - 1
        if arr.ndim == 2:
            arr = arr[:, :, None]
        out = {}
        if self.local_classes is not None:
            out["y"] = np.array(self.local_classes[index], dtype=np.int64)
        return np.transpose(arr, [2, 0, 1]), out


# ----------------------------------------------------------------------------- loading


def _check_arguments(data_dir, batch_size, image_size, num_workers):
    if not data_dir:
        raise usage(ValueError(
            "no data directory given (data_dir is empty); pass --data_dir PATH to a folder of images"
        ))
    if not _is_remote(data_dir) and not os.path.exists(data_dir):
        raise usage(FileNotFoundError(f"data directory {data_dir!r} does not exist; check --data_dir"))
    if not _isdir(data_dir):
        raise usage(NotADirectoryError(
            f"--data_dir {data_dir!r} is not a directory; pass the folder that holds the images"
        ))
    for name, value in (("batch_size", batch_size), ("image_size", image_size)):
        if not isinstance(value, numbers.Integral) or value < 1:
            raise usage(ValueError(f"{name} must be a positive integer, got {value!r}; check --{name}"))
    if not isinstance(num_workers, numbers.Integral) or num_workers < 0:
        raise usage(ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}; check --num_workers"))


def _forever(loader):
    """Yield the loader's batches epoch after epoch."""
    while True:
        batches = iter(loader)
        try:
            yield from batches
        except Exception as err:
            if loader.num_workers == 0:
                raise
            # A worker's error arrives with the worker's traceback in its message. Dropping
            # the local traceback frees the iterator now, so its worker processes stop at
            # once instead of stalling the exit for seconds when the traceback is freed.
            err.with_traceback(None)
            del batches
            if isinstance(err, BadImageError):  # the user's file: its own message, without the worker's trace
                raise BadImageError(_worker_message(err)) from None
            raise err


def _worker_message(err):
    """The original message of an exception re-raised from a DataLoader worker, whose text is
    "Caught X in DataLoader worker process N. Original Traceback ... X: message"."""
    text = str(err)
    marker = f"{type(err).__name__}: "
    return text[text.rindex(marker) + len(marker):].strip() if marker in text else text


def load_data(
    *,
    data_dir,                # folder searched recursively for .jpg/.jpeg/.png/.gif files
    batch_size,              # images per batch on this process
    image_size,              # side of the square images
    class_cond=False,        # add {"y": labels} from the file-name prefixes
    deterministic=False,     # keep the file order instead of shuffling every epoch
    random_crop=False,       # random crops instead of centre crops
    random_flip=True,        # mirror half of the images
    num_workers=1,           # DataLoader worker processes (0: load in this process)
    skip_bad_images=False,   # skip unreadable files with a warning instead of failing
    in_channels=3,           # 3: RGB batches, 1: grayscale batches
):
    """Endless generator of ``(images, cond)`` batches from ``data_dir`` (see the module docstring).

    Arguments are checked and the folder listed at call time, so mistakes
    surface before training starts.
    """
    _check_arguments(data_dir, batch_size, image_size, num_workers)
    paths = _list_image_files_recursively(data_dir)
    if not paths:
        raise usage(ValueError(
            f"no images found in data directory {data_dir!r} (searched recursively for files ending in "
            f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)}); check --data_dir"
        ))
    classes = class_labels(paths) if class_cond else None
    rank, world_size = dist_util.rank_and_world()
    dataset = ImageDataset(
        image_size,
        paths,
        classes=classes,
        shard=rank,
        num_shards=world_size,
        random_crop=random_crop,
        random_flip=random_flip,
        skip_bad_images=skip_bad_images,
        in_channels=in_channels,
    )
    if len(dataset) < batch_size:
        raise usage(ValueError(
            f"process {rank} of {world_size} gets {len(dataset)} of the {len(paths)} images in {data_dir!r}, "
            f"fewer than one batch of {batch_size} (incomplete batches are dropped); "
            "use a smaller --batch_size, fewer processes or more images"
        ))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=not deterministic,
        num_workers=num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
    )
    return _forever(loader)
