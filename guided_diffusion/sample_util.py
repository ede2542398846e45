"""Shared machinery of the sampling and likelihood command-line tools.

The scripts ``image_sample.py``, ``classifier_sample.py``, ``super_res_sample.py``
and ``image_nll.py`` differ only in how they build a model and one batch; this
module holds what they have in common:

* flags beyond the original's (``--seed``, ``--log_dir``, ``--save_png``, ...);
* seeding: every *global* batch ``k`` gets its own seed derived from ``--seed``,
  so the images do not depend on how many processes share the work;
* splitting ``num_samples`` into batches, handing them to ranks round-robin and
  gathering the results on rank 0 (no rank samples more than its share);
* converting samples to uint8 NHWC, and writing the npz (atomically), a PNG grid
  and, on request, one PNG per image;
* reading ``--base_samples`` for super-resolution (npz or a folder of images);
* classifier guidance as a ``cond_fn`` (Dhariwal & Nichol 2021, Sec. 4).

Errors caused by what the user typed are raised as :class:`UsageError`; the
scripts print them as one ``error:`` line (see `errors.run_main`).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import perf
from .dist_util import comm_device as _comm_device
from .errors import UsageError
from .script_util import str2bool

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif")
GRID_MAX_IMAGES = 64  # the PNG grid beside the npz shows at most this many images


# --------------------------------------------------------------------------- flags


def add_sampling_flags(parser: argparse.ArgumentParser, *, class_choice: bool = True) -> None:
    """Add the flags every sampling script has beyond the original's ones."""
    parser.add_argument(
        "--seed", type=int, default=None,
        help="base random seed; the same command with the same seed gives the same images "
        "(default: a fresh seed, written to the log)",
    )
    parser.add_argument(
        "--log_dir", type=str, default="",
        help="folder for the outputs (default: $OPENAI_LOGDIR, else a new temporary folder)",
    )
    parser.add_argument("--save_png", action="store_true", help="also write one PNG per image")
    parser.add_argument("--progress", action="store_true", help="show a progress bar over diffusion steps")
    parser.add_argument(
        "--use_plms", type=str2bool, nargs="?", const=True, default=False,
        help="sample with PLMS, pseudo linear multistep (Liu et al. 2022): few respaced steps "
        "(--timestep_respacing 50), no noise after the start; not with --use_ddim (default: False)",
    )
    perf.add_perf_flags(parser)
    if class_choice:
        parser.add_argument(
            "--class_label", type=int, default=-1,
            help="draw every sample of this class (default -1: random labels in [0, num_classes))",
        )
    if class_choice and not _has_flag(parser, "num_classes"):
        from .script_util import NUM_CLASSES

        parser.add_argument(
            "--num_classes", type=int, default=NUM_CLASSES,
            help="number of classes labels are drawn from",
        )


def _has_flag(parser: argparse.ArgumentParser, dest: str) -> bool:
    return any(action.dest == dest for action in parser._actions)


def check_positive(flag: str, value: int, example: int) -> None:
    """Raise :class:`UsageError` unless ``value`` is a positive integer."""
    if value is None or value <= 0:
        raise UsageError(f"--{flag} must be a positive number, got {value}; pass e.g. --{flag} {example}")


def check_class_label(class_label: int, num_classes: int) -> None:
    """``class_label`` is -1 (random labels) or a class id below ``num_classes``."""
    check_positive("num_classes", num_classes, 1000)
    if class_label < -1 or class_label >= num_classes:
        raise UsageError(
            f"--class_label {class_label} is not a class of this model: use 0..{num_classes - 1}, "
            f"or -1 for random labels (change --num_classes if the model has more classes)"
        )


def check_respacing(diffusion_steps: int, timestep_respacing: str) -> None:
    """Fail early, naming the flags, when ``--timestep_respacing`` cannot be met."""
    if not timestep_respacing:
        return
    from .respace import space_timesteps

    try:
        space_timesteps(diffusion_steps, timestep_respacing)
    except (ValueError, AssertionError) as err:
        raise UsageError(
            f"--timestep_respacing {timestep_respacing!r} cannot be met with --diffusion_steps "
            f"{diffusion_steps} ({err}); use fewer steps, e.g. --timestep_respacing 250 or ddim25, "
            f"or leave it empty for all {diffusion_steps} steps"
        ) from None


def flags_dict(args: argparse.Namespace, keys) -> dict:
    """The values of ``keys`` in ``args`` (the factories' keyword arguments)."""
    return {key: getattr(args, key) for key in keys}


# ------------------------------------------------------------------- distribution


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Sum a float64 array over all ranks (a copy; unchanged with one process)."""
    values = np.asarray(values, dtype=np.float64)
    if rank_and_world()[1] == 1:
        return values.copy()
    tensor = torch.from_numpy(values.copy()).to(_comm_device())
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def resolve_seed(seed: Optional[int]) -> int:
    """The run's base seed: ``seed`` itself, or one fresh seed shared by all ranks."""
    if seed is not None:
        if seed < 0:
            raise UsageError(f"--seed must be >= 0, got {seed}; pass e.g. --seed 0")
        return int(seed)
    fresh = int(np.random.SeedSequence().generate_state(1)[0])
    if rank_and_world()[1] > 1:
        tensor = torch.tensor([fresh], dtype=torch.int64, device=_comm_device())
        dist.broadcast(tensor, src=0)
        fresh = int(tensor.item())
    return fresh


def derived_seed(seed: int, *path: int) -> int:
    """A 32-bit seed for the stream named by ``path`` (e.g. batch index), derived from ``seed``."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])


def batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    """Sizes of the global batches that make exactly ``num_samples`` images."""
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def rank_share(num_items: int, rank: int, world: int) -> int:
    """How many of items ``0..num_items-1`` fall on ``rank`` when item i goes to rank i % world."""
    return len(range(rank, num_items, world))


# ---------------------------------------------------------------------- sampling


def to_uint8_images(sample: torch.Tensor) -> np.ndarray:
    """NCHW floats in [-1, 1] -> NHWC uint8, rounding down as the original does."""
    sample = ((sample + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return sample.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def from_uint8_images(images: np.ndarray) -> torch.Tensor:
    """NHWC uint8 -> NCHW float32 in [-1, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1.0
    return tensor.permute(0, 3, 1, 2).contiguous()


def draw_labels(seed: int, size: int, num_classes: int, class_label: int = -1) -> torch.Tensor:
    """``size`` int64 labels: all ``class_label``, or uniform in [0, num_classes) from ``seed``.

    Labels come from their own generator, so a class-conditional and an
    unconditional run with the same seed start from the same noise.
    """
    if class_label >= 0:
        return torch.full((size,), class_label, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (size,), generator=generator, dtype=torch.int64)


def classifier_cond_fn(classifier: torch.nn.Module, scale: float) -> Callable:
    """``cond_fn(x, t, y) = scale * d/dx log p(y | x_t)`` for classifier guidance.

    Dhariwal & Nichol 2021, Algorithms 1-2: the gradient of the classifier's
    log-softmax at the wanted labels, taken with respect to the noisy image x_t
    (shape NCHW, same as the returned gradient).
    """

    def cond_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor = None) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier guidance needs labels: pass model_kwargs={'y': labels}")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            chosen = log_probs[torch.arange(len(y), device=log_probs.device), y.view(-1)]
            return torch.autograd.grad(chosen.sum(), x_in)[0] * scale

    return cond_fn


BatchFn = Callable[[int, int], tuple]


def sample_in_batches(
    make_batch: BatchFn,
    *,
    num_samples: int,
    batch_size: int,
    image_shape: tuple[int, int, int],
    with_labels: bool,
    desc: str = "batches",
):
    """Run ``make_batch(k, n)`` for every global batch and gather the results on rank 0.

    ``make_batch`` returns ``(images, labels)``: uint8 NHWC of ``image_shape``
    and int64 labels (or None when ``with_labels`` is False). Batch ``k`` runs on
    rank ``k % world``. Returns ``(images, labels)`` with exactly ``num_samples``
    rows in batch order on rank 0, ``(None, None)`` on the other ranks.
    """
    from tqdm.auto import tqdm

    rank, world = rank_and_world()
    sizes = batch_sizes(num_samples, batch_size)
    images_by_batch, labels_by_batch = {}, {}
    bar = tqdm(total=len(sizes), desc=desc, unit="batch", disable=rank != 0)
    for first in range(0, len(sizes), world):
        index = first + rank
        if index < len(sizes):
            images, labels = make_batch(index, sizes[index])
        else:  # nothing left for this rank, but it still joins the gather
            images, labels = np.zeros((0, *image_shape), np.uint8), np.zeros((0,), np.int64)
        if labels is None:
            labels = np.zeros((len(images),), np.int64)
        for source, (got_images, got_labels) in enumerate(_gather(images, labels, batch_size, image_shape)):
            if first + source < len(sizes):
                images_by_batch[first + source] = got_images
                labels_by_batch[first + source] = got_labels
        bar.update(min(world, len(sizes) - first))
    bar.close()
    if rank != 0:
        return None, None
    images = np.concatenate([images_by_batch[k] for k in range(len(sizes))])
    labels = np.concatenate([labels_by_batch[k] for k in range(len(sizes))]) if with_labels else None
    return images, labels


def _gather(images: np.ndarray, labels: np.ndarray, batch_size: int, image_shape) -> list:
    """Every rank's (images, labels) of this round, in rank order (padded all_gather)."""
    if rank_and_world()[1] == 1:
        return [(images, labels)]
    device = _comm_device()
    count = torch.tensor([len(images)], dtype=torch.int64, device=device)
    padded_images = torch.zeros((batch_size, *image_shape), dtype=torch.uint8, device=device)
    padded_images[: len(images)] = torch.from_numpy(images).to(device)
    padded_labels = torch.zeros((batch_size,), dtype=torch.int64, device=device)
    padded_labels[: len(labels)] = torch.from_numpy(np.asarray(labels, np.int64)).to(device)
    world = dist.get_world_size()
    counts = [torch.zeros_like(count) for _ in range(world)]
    all_images = [torch.zeros_like(padded_images) for _ in range(world)]
    all_labels = [torch.zeros_like(padded_labels) for _ in range(world)]
    dist.all_gather(counts, count)
    dist.all_gather(all_images, padded_images)
    dist.all_gather(all_labels, padded_labels)
    return [
        (imgs[: int(n)].cpu().numpy(), labs[: int(n)].cpu().numpy())
        for n, imgs, labs in zip(counts, all_images, all_labels)
    ]


# ------------------------------------------------------------------------ models


def load_weights(model: torch.nn.Module, path: str, *, flag: str, flags: Optional[dict] = None) -> None:
    """Load the checkpoint at ``path`` (given by ``--flag``) into ``model``, strictly.

    Rank 0 reads the file and broadcasts it (``dist_util.load_state_dict``); a
    checkpoint that does not fit the model raises ``checkpoints.CheckpointError``
    with the mismatched keys and the flags the checkpoint implies.
    """
    from . import checkpoints, dist_util

    if not path:
        raise UsageError(f"--{flag} is empty: pass the checkpoint to load, e.g. --{flag} models/64x64_diffusion.pt")
    if "://" not in path and not os.path.isfile(path):
        raise UsageError(f"--{flag} {path!r}: no such file; check the path (download the checkpoint first)")
    state_dict = dist_util.load_state_dict(path, map_location="cpu")
    checkpoints.load_model_weights(model, state_dict, flags=flags, source=path)


# ------------------------------------------------------------------------ output


def samples_file_name(images: np.ndarray) -> str:
    """``samples_{N}x{H}x{W}x{C}.npz`` as the original names it."""
    return "samples_" + "x".join(str(d) for d in images.shape) + ".npz"


def atomic_savez(path: str, **arrays: np.ndarray) -> None:
    """``np.savez`` to a temporary file beside ``path``, then rename: never a partial npz."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def _to_pil(image: np.ndarray):
    from PIL import Image

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
    _to_pil(image_grid(images)).save(path[: -len(".npz")] + ".png")
    if save_png:
        png_dir = os.path.join(out_dir, "samples")
        os.makedirs(png_dir, exist_ok=True)
        for i, image in enumerate(images):
            suffix = "" if labels is None else f"_{int(labels[i])}"
            _to_pil(image).save(os.path.join(png_dir, f"{i:06d}{suffix}.png"))
    return path


# ------------------------------------------------------------------- base samples


def load_base_samples(path: str, *, image_size: int, channels: int, class_cond: bool):
    """Low-resolution inputs for super-resolution: ``(uint8 NHWC images, labels or None)``.

    ``path`` is an npz as written by ``image_sample.py`` (``arr_0`` uint8 NHWC,
    ``arr_1`` labels, needed when ``class_cond``) or a folder of images, which
    are centre-cropped and resized to ``image_size``; their labels come from the
    file names as in ``image_datasets`` (text before the first ``_``, classes
    numbered in sorted order).
    """
    if not path:
        raise UsageError("--base_samples is empty: pass an npz from image_sample.py or a folder of images")
    if os.path.isdir(path):
        images, labels = _load_image_folder(path, image_size, channels, class_cond)
    elif os.path.isfile(path):
        images, labels = _load_npz(path, class_cond)
    else:
        raise UsageError(f"--base_samples {path!r}: no such file or folder")
    expected = (image_size, image_size, channels)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise UsageError(
            f"--base_samples {path!r}: arr_0 has shape {images.shape}, expected N x {image_size} x "
            f"{image_size} x {channels} (NHWC); set --small_size / --in_channels to match the file"
        )
    if images.dtype != np.uint8:
        raise UsageError(
            f"--base_samples {path!r}: arr_0 has dtype {images.dtype}, expected uint8 pixels in 0..255 "
            f"(as written by image_sample.py)"
        )
    if len(images) == 0:
        raise UsageError(f"--base_samples {path!r} holds no images")
    return images, labels


def _load_npz(path: str, class_cond: bool):
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UsageError(f"--base_samples {path!r} is not a readable npz file ({err})") from None
    with archive:
        keys = sorted(archive.files)
        if "arr_0" not in keys:
            raise UsageError(
                f"--base_samples {path!r} has keys {keys} but no 'arr_0' (the images); "
                f"save them with np.savez(path, images, labels)"
            )
        images = archive["arr_0"]
        labels = None
        if class_cond:
            if "arr_1" not in keys:
                raise UsageError(
                    f"--base_samples {path!r} has no 'arr_1' labels (keys {keys}) but --class_cond is True; "
                    f"add labels or sample with --class_cond False"
                )
            labels = np.asarray(archive["arr_1"]).astype(np.int64)
            if labels.shape != (len(images),):
                raise UsageError(
                    f"--base_samples {path!r}: arr_1 has shape {labels.shape}, expected ({len(images)},) "
                    f"(one label per image)"
                )
    return images, labels


def _load_image_folder(path: str, image_size: int, channels: int, class_cond: bool):
    from .image_datasets import center_crop_arr, class_labels, list_image_files, read_image

    files = list_image_files(path)
    if not files:
        raise UsageError(f"--base_samples {path!r} is a folder without images ({', '.join(IMAGE_EXTENSIONS)})")
    if channels not in (1, 3):
        raise UsageError(f"--in_channels {channels}: image folders give 1 (grayscale) or 3 (RGB) channels")
    images = [
        center_crop_arr(read_image(file, channels), image_size).reshape(image_size, image_size, channels)
        for file in files
    ]
    labels = np.array(class_labels(files), dtype=np.int64) if class_cond else None
    return np.stack(images).astype(np.uint8), labels


# ------------------------------------------------------------------ script driver


def prepare_model(model: torch.nn.Module, path: str, *, flag: str, flags: dict, use_fp16: bool) -> torch.nn.Module:
    """Load weights, move to this rank's device, optionally cast to float16, set eval mode."""
    from . import dist_util

    load_weights(model, path, flag=flag, flags=flags)
    model.to(dist_util.dev())
    if use_fp16:
        model.convert_to_fp16()
    return model.eval()


def pick_sample_loop(diffusion, args: argparse.Namespace) -> Callable:
    """The sampling loop the flags ask for: DDPM, ``--use_ddim`` or ``--use_plms``."""
    use_plms = getattr(args, "use_plms", False)
    if args.use_ddim and use_plms:
        raise UsageError("--use_ddim and --use_plms pick two different samplers; pass only one of them.")
    if use_plms:
        return diffusion.plms_sample_loop
    return diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop


def generate_and_save(
    args: argparse.Namespace,
    *,
    diffusion,
    model_fn: Callable,
    image_shape: tuple[int, int, int],
    conditioning: Callable[[int, int, int], tuple],
    with_labels: bool,
    cond_fn: Optional[Callable] = None,
) -> Optional[str]:
    """Sample ``args.num_samples`` images in batches on all ranks and save them on rank 0.

    ``image_shape`` is (C, H, W). ``conditioning(k, n, seed)`` returns
    ``(model_kwargs, labels)`` for global batch ``k`` of ``n`` images (labels:
    int64 numpy or None). The noise of batch ``k`` comes from
    ``derived_seed(seed, k)``, so the images depend only on ``--seed`` and
    ``--batch_size``, not on the number of processes. Returns the npz path on
    rank 0 (also printed, as the last line), None elsewhere.
    """
    from . import dist_util, logger

    check_positive("num_samples", args.num_samples, 16)
    check_positive("batch_size", args.batch_size, 16)
    rank, world = rank_and_world()
    seed = resolve_seed(args.seed)
    logger.log(f"sampling {args.num_samples} images with seed {seed} on {world} process(es)")
    sample_loop = pick_sample_loop(diffusion, args)
    channels, height, width = image_shape

    def make_batch(index: int, size: int):
        model_kwargs, labels = conditioning(index, size, seed)
        model_kwargs = {key: value.to(dist_util.dev()) for key, value in model_kwargs.items()}
        torch.manual_seed(derived_seed(seed, index))
        sample = sample_loop(
            model_fn,
            (size, channels, height, width),
            clip_denoised=args.clip_denoised,
            model_kwargs=model_kwargs,
            cond_fn=cond_fn,
            device=dist_util.dev(),
            progress=args.progress and rank == 0,
        )
        return to_uint8_images(sample), labels

    images, labels = sample_in_batches(
        make_batch,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        image_shape=(height, width, channels),
        with_labels=with_labels,
        desc="sampling",
    )
    path = None
    if rank == 0:
        path = save_samples(images, labels, logger.get_dir(), save_png=args.save_png)
        logger.log(f"saved {len(images)} samples to {path}")
    if world > 1:
        dist.barrier()
    logger.log("sampling complete")
    if path is not None:
        print(path, flush=True)  # the last line of output: the npz's absolute path
    return path
