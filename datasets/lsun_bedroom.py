"""
Export an LSUN lmdb database (e.g. ``bedroom_train_lmdb``) to a folder of PNGs.

Every image is resized and centre-cropped to ``--image_size`` exactly as
``guided_diffusion.image_datasets.center_crop_arr`` does for training (halve
with a BOX filter while the short side is at least twice the target, then a
BICUBIC resize of the short side to the target, then a centre crop), and saved
as ``<prefix>_0000000.png``, ``<prefix>_0000001.png``, ... in database order.

Download the database with the LSUN tools (https://github.com/fyu/lsun:
``python3 download.py -c bedroom``), then

    python datasets/lsun_bedroom.py bedroom_train_lmdb data/lsun_bedroom --image_size 256

Needs the optional ``lmdb`` package (``pip install lmdb``).
"""

import argparse
import io
import os
import sys

if __package__ in (None, ""):  # run as a file from a clone that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image


def _import_lmdb():
    try:
        import lmdb
    except ImportError:
        raise ImportError(
            "reading LSUN needs the optional 'lmdb' package, which is not installed; "
            "run: pip install lmdb"
        ) from None
    return lmdb


def iter_lmdb_images(lmdb_path):
    """Yield ``(key, PIL RGB image)`` for every record of the database, in key order."""
    lmdb = _import_lmdb()
    if not os.path.exists(lmdb_path):
        raise FileNotFoundError(
            f"no lmdb database at {lmdb_path}; pass the folder made by the LSUN "
            f"download tools, e.g. bedroom_train_lmdb."
        )
    env = lmdb.open(
        lmdb_path, subdir=os.path.isdir(lmdb_path), readonly=True, lock=False,
        readahead=False, meminit=False, max_readers=1,
    )
    try:
        with env.begin(write=False) as txn:
            for key, value in txn.cursor():
                try:
                    image = Image.open(io.BytesIO(value))
                    image.load()
                except OSError as error:
                    raise ValueError(
                        f"record {key!r} of {lmdb_path} is not an image PIL can read: {error}"
                    ) from None
                yield key, image.convert("RGB")
    finally:
        env.close()


def export(lmdb_path, out_dir, image_size=256, prefix="bedroom", max_images=None):
    """Write the database's images as ``<prefix>_<index:07d>.png``; returns the count."""
    from guided_diffusion.image_datasets import center_crop_arr

    if image_size < 1:
        raise ValueError(f"--image_size must be positive, got {image_size}.")
    if not prefix or "_" in prefix or os.sep in prefix:
        raise ValueError(
            f"--prefix {prefix!r} must be a non-empty name without '_' or '{os.sep}', "
            f"since load_data reads the class from the text before the first '_'."
        )
    os.makedirs(out_dir, exist_ok=True)
    count = 0
    for _, image in iter_lmdb_images(lmdb_path):
        if max_images is not None and count >= max_images:
            break
        crop = center_crop_arr(image, image_size)
        Image.fromarray(crop).save(os.path.join(out_dir, f"{prefix}_{count:07d}.png"))
        count += 1
    return count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0].replace("\n", " "))
    parser.add_argument("lmdb_path", help="LSUN lmdb folder, e.g. bedroom_train_lmdb")
    parser.add_argument("out_dir", help="folder to write the PNGs into")
    parser.add_argument(
        "--image_size", "--image-size", type=int, default=256,
        help="side of the square output images (default %(default)s)",
    )
    parser.add_argument("--prefix", default="bedroom", help="file name prefix, i.e. the class name")
    parser.add_argument(
        "--max_images", type=int, default=None, help="stop after this many images (default: all)"
    )
    args = parser.parse_args(argv)
    try:
        count = export(args.lmdb_path, args.out_dir, args.image_size, args.prefix, args.max_images)
    except (ImportError, OSError, ValueError) as error:
        print(f"lsun_bedroom.py: {error}", file=sys.stderr)
        return 1
    print(f"wrote {count} images of {args.image_size}x{args.image_size} to {os.path.abspath(args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
