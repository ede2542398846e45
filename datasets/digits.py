"""
Write scikit-learn's bundled handwritten digits as a class-labelled image folder.

The 1,797 real 8x8 digits ship inside scikit-learn, so this dataset needs no
download. Each digit becomes one PNG named ``<digit>_<index>.png`` (for example
``3_00042.png``: the digit 3, image 42 of ``sklearn.datasets.load_digits``);
``image_datasets.load_data(class_cond=True)`` reads the part before the first
``_`` as the class, and the names ``0``..``9`` sort to labels 0..9.

Ink is bright on black. Digits are blown up to ``--image_size`` with bicubic
interpolation (``guided_diffusion.digits_check`` reverses this when it scores
samples). The output is deterministic: the same files, byte for byte, on every
run.

    python datasets/digits.py --out_dir data/digits --image_size 16
    python datasets/digits.py --out_dir data/digits --holdout_fraction 0.2   # train/ and test/
"""

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file from a clone that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion.digits_check import (
    DIGIT_SIZE,
    digit_to_image,
    holdout_split,
    load_real_digits,
)


def digit_file_name(label, index):
    """``3_00042.png`` for digit 3 at position 42 of the scikit-learn dataset."""
    return f"{int(label)}_{int(index):05d}.png"


def export_digits(out_dir, image_size=DIGIT_SIZE, rgb=False, holdout_fraction=0.0, seed=0):
    """Write the digits as PNGs and return the number of files per folder.

    :param out_dir: destination folder (created). With ``holdout_fraction`` > 0
        the images go to ``out_dir/train`` and ``out_dir/test`` instead.
    :param image_size: side of the written images in pixels (>= 8).
    :param rgb: write RGB PNGs (three equal channels) instead of grayscale.
    :param holdout_fraction: share of each class written to ``test/`` (0 = none).
    :param seed: seed of the stratified held-out split.
    :return: dict mapping each written folder to its number of images.
    """
    images, labels = load_real_digits()
    if holdout_fraction > 0:
        train_idx, test_idx = holdout_split(labels, holdout_fraction, seed)
        parts = {os.path.join(out_dir, "train"): train_idx, os.path.join(out_dir, "test"): test_idx}
    elif holdout_fraction == 0:
        parts = {out_dir: range(len(labels))}
    else:
        raise ValueError(
            f"--holdout_fraction must be in [0, 1), got {holdout_fraction}."
        )
    counts = {}
    for folder, indices in parts.items():
        os.makedirs(folder, exist_ok=True)
        for index in indices:
            image = digit_to_image(images[index], image_size, rgb=rgb)
            # No metadata chunks, fixed compression: identical bytes every run.
            image.save(
                os.path.join(folder, digit_file_name(labels[index], index)),
                format="PNG", optimize=False, compress_level=6,
            )
        counts[folder] = len(indices)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--out_dir", required=True, help="folder to write the PNGs into")
    parser.add_argument(
        "--image_size", type=int, default=DIGIT_SIZE,
        help="side of the written images; digits are upscaled bicubically (default %(default)s)",
    )
    parser.add_argument("--rgb", action="store_true", help="write RGB instead of grayscale PNGs")
    parser.add_argument(
        "--holdout_fraction", type=float, default=0.0,
        help="share of each class written to OUT_DIR/test (the rest to OUT_DIR/train); "
        "0 writes every digit to OUT_DIR (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    args = parser.parse_args(argv)
    try:
        counts = export_digits(
            args.out_dir, args.image_size, args.rgb, args.holdout_fraction, args.seed
        )
    except ValueError as error:
        parser.error(str(error))
    for folder, count in counts.items():
        print(f"wrote {count} digits of {args.image_size}x{args.image_size} to {os.path.abspath(folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
