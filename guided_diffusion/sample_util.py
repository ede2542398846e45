"""Seeds and work-sharing of the sampling and likelihood scripts over ranks.

* seeding: every *global* batch ``k`` gets its own seed derived from ``--seed``,
  so the images do not depend on how many processes share the work; labels
  are drawn from a generator of their own;
* splitting ``num_samples`` into batches, handing them to ranks round-robin and
  gathering the results on rank 0 (no rank samples more than its share), and
  summing statistics over ranks.

With no process group (a plain ``python script.py``) every helper works as the
only rank of one.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .dist_util import comm_device, rank_and_world
from .errors import UsageError


# --------------------------------------------------------------------------- seeds


def resolve_seed(seed: Optional[int]) -> int:
    """The run's base seed: ``seed`` itself, or one fresh seed shared by all ranks."""
    if seed is not None:
        if seed < 0:
            raise UsageError(f"--seed must be >= 0, got {seed}; pass e.g. --seed 0")
        return int(seed)
    fresh = int(np.random.SeedSequence().generate_state(1)[0])
    if rank_and_world()[1] > 1:
        tensor = torch.tensor([fresh], dtype=torch.int64, device=comm_device())
        dist.broadcast(tensor, src=0)
        fresh = int(tensor.item())
    return fresh


def derived_seed(seed: int, *path: int) -> int:
    """A 32-bit seed for the stream named by ``path`` (e.g. batch index), derived from ``seed``."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])


def draw_labels(seed: int, size: int, num_classes: int, class_label: int = -1) -> torch.Tensor:
    """``size`` int64 labels: all ``class_label``, or uniform in [0, num_classes) from ``seed``.

    Labels come from their own generator, so a class-conditional and an
    unconditional run with the same seed start from the same noise.
    """
    if class_label >= 0:
        return torch.full((size,), class_label, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (size,), generator=generator, dtype=torch.int64)


# ----------------------------------------------------------------- work over ranks


def batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    """Sizes of the global batches that make exactly ``num_samples`` images."""
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def rank_share(num_items: int, rank: int, world: int) -> int:
    """How many of items ``0..num_items-1`` fall on ``rank`` when item i goes to rank i % world."""
    return len(range(rank, num_items, world))


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Sum a float64 array over all ranks (a copy; unchanged with one process)."""
    values = np.asarray(values, dtype=np.float64)
    if rank_and_world()[1] == 1:
        return values.copy()
    tensor = torch.from_numpy(values.copy()).to(comm_device())
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


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
    device = comm_device()
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
