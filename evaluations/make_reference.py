"""Make a reference batch, in the format of OpenAI's, from an image folder or an npz.

    python evaluations/make_reference.py SOURCE OUT.npz [--image_size N] [--arr_0_size 10000]
        [--seed 0] [--inception_weights PATH] [--batch_size 64] [--device cuda|cpu]

SOURCE is a folder of images (.jpg .jpeg .png .gif, searched recursively) or an
``.npz`` whose ``arr_0`` holds uint8 images N x H x W x 3. OUT.npz holds what the
ADM reference batches hold: ``mu``, ``sigma`` (pool features) and ``mu_s``,
``sigma_s`` (sFID features) over every image of SOURCE, and ``arr_0``, a random
subset of ``--arr_0_size`` images (all of them when there are fewer) that
``evaluator.py`` uses for precision and recall. Folder images are read as the
training data loader reads them (RGB, 16-bit and transparent images converted),
and with ``--image_size`` resized and centre-cropped as it does.
"""

import argparse
import contextlib
import os
import sys
from typing import Dict, Iterator, Tuple

import numpy as np

if __package__ in (None, ""):  # run as a script: make the `evaluations` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluations.evaluator import Evaluator, _parse_device, add_network_arguments  # noqa: E402
from evaluations.inception import InceptionWeightsError  # noqa: E402
from evaluations.npz_io import BatchIterator, open_npz_array  # noqa: E402
from guided_diffusion.atomic import atomic_savez  # noqa: E402
from guided_diffusion.errors import run_main, usage  # noqa: E402
from guided_diffusion.image_datasets import IMAGE_EXTENSIONS, center_crop_arr, list_image_files, read_image  # noqa: E402

__all__ = ["folder_batches", "make_reference", "create_argparser", "main"]


def _folder_image(path: str, image_size, first_shape) -> np.ndarray:
    image = read_image(path)
    arr = center_crop_arr(image, image_size) if image_size else np.asarray(image)
    if first_shape is not None and arr.shape != first_shape:
        raise usage(
            ValueError(
                f"{path} is {arr.shape[1]}x{arr.shape[0]} but the first image is "
                f"{first_shape[1]}x{first_shape[0]}: pass --image_size N to resize and centre-crop "
                "every image to N x N."
            )
        )
    return arr


def folder_batches(folder: str, image_size=None, batch_size: int = 64) -> Tuple[BatchIterator, int]:
    """uint8 NHWC batches of the images under ``folder`` (sorted, recursive), of one size,
    and the number of images."""
    if not os.path.isdir(folder):
        raise usage(FileNotFoundError(f"{folder} is neither an image folder nor an .npz file."))
    paths = list_image_files(folder)
    if len(paths) < 2:
        found = f"found {len(paths)} image(s) ({' '.join('.' + e for e in IMAGE_EXTENSIONS)}) under {folder}"
        raise usage(ValueError(f"{found}; statistics need at least 2."))

    def batches() -> Iterator[np.ndarray]:
        first_shape = None
        for start in range(0, len(paths), batch_size):
            images = []
            for path in paths[start : start + batch_size]:
                images.append(_folder_image(path, image_size, first_shape))
                first_shape = images[0].shape if first_shape is None else first_shape
            yield np.stack(images)

    return BatchIterator(batches, -(-len(paths) // batch_size)), len(paths)


def make_reference(
    evaluator: Evaluator, batches: BatchIterator, num_images: int, arr_0_size: int = 10000, seed: int = 0
) -> Dict[str, np.ndarray]:
    """The arrays of a reference batch: statistics of every image, ``arr_0`` a random subset.

    :param batches: uint8 NHWC batches, ``num_images`` images in all.
    :param arr_0_size: images kept in ``arr_0`` (in their order in ``batches``).
    :param seed: seed of the subset's draw.
    """
    keep = np.arange(num_images)
    if num_images > arr_0_size:
        keep = np.sort(np.random.RandomState(seed).choice(num_images, arr_0_size, replace=False))
    kept = []

    def keeping() -> Iterator[np.ndarray]:
        offset = 0
        for batch in batches:
            rows = keep[(keep >= offset) & (keep < offset + len(batch))] - offset
            kept.append(np.asarray(batch)[rows])
            offset += len(batch)
            yield batch

    pool, spatial = evaluator.compute_activations(BatchIterator(keeping, len(batches)))
    stats, stats_spatial = evaluator.compute_statistics(pool), evaluator.compute_statistics(spatial)
    return {
        "arr_0": np.concatenate(kept),
        "mu": stats.mu,
        "sigma": stats.sigma,
        "mu_s": stats_spatial.mu,
        "sigma_s": stats_spatial.sigma,
    }


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Make a reference batch (arr_0, mu, sigma, mu_s, sigma_s) from an image folder or an npz."
    )
    parser.add_argument("source", help="image folder, or .npz with arr_0 = uint8 images N x H x W x 3")
    parser.add_argument("out", help="reference batch .npz to write")
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="resize the shorter side and centre-crop folder images to this size, as training does "
        "(default: keep them as they are; they must then all have one size)",
    )
    parser.add_argument(
        "--arr_0_size",
        type=int,
        default=10000,
        help="images kept in arr_0 for precision/recall, drawn at random (OpenAI's batches keep 10000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the arr_0 subset's draw")
    add_network_arguments(parser)
    return parser


def _check_arguments(args) -> None:
    for flag in ("image_size", "arr_0_size", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise usage(ValueError(f"--{flag} must be a positive number, got {value}."))
    if not args.out.endswith(".npz"):
        raise usage(ValueError(f"the output {args.out} must end in .npz (it is read with numpy.load)."))


def main(argv=None) -> None:
    args = create_argparser().parse_args(argv)
    _check_arguments(args)
    device = _parse_device(args.device)
    evaluator = Evaluator(batch_size=args.batch_size, device=device, weights_path=args.inception_weights)
    try:
        with contextlib.ExitStack() as stack:
            if os.path.isfile(args.source):
                if args.image_size is not None:
                    raise usage(ValueError("--image_size applies to image folders; an npz's images are used as is."))
                reader = stack.enter_context(open_npz_array(args.source, "arr_0"))
                batches, num_images = reader.read_batches(args.batch_size), reader.remaining()
            else:
                batches, num_images = folder_batches(args.source, args.image_size, args.batch_size)
            print(f"computing the activations of {num_images} images...")
            arrays = make_reference(evaluator, batches, num_images, args.arr_0_size, args.seed)
    except (InceptionWeightsError, ValueError, FileNotFoundError) as err:
        # npz_io, the network and the statistics word these for the user (as evaluator.py prints them)
        raise usage(err) from None
    atomic_savez(args.out, **arrays)
    print(f"wrote {args.out}: arr_0 {arrays['arr_0'].shape}, statistics of {num_images} images")


if __name__ == "__main__":
    run_main(main)
