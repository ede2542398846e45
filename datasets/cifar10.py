"""
Convert the official CIFAR-10 python batches into class-prefixed PNG folders.

Reads ``cifar-10-python.tar.gz`` (from https://www.cs.toronto.edu/~kriz/cifar.html)
directly, without extracting it, or a folder holding its extracted batches
(``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``), and writes

    OUT_DIR/train/airplane_00000.png ... (50,000 images)
    OUT_DIR/test/airplane_00003.png  ... (10,000 images)

The number is the image's position in its split; the prefix before the first
``_`` is the class name, which ``image_datasets.load_data(class_cond=True)``
turns into a label (names sorted: airplane=0, automobile=1, ..., truck=9, the
same order as CIFAR-10's own label numbers).

The batches are Python pickles. They are read with an unpickler that only
accepts what the official files contain (numpy arrays, plain containers), so a
tampered file cannot run code.

    python datasets/cifar10.py cifar-10-python.tar.gz data/cifar10
"""

import argparse
import importlib
import io
import os
import pickle
import sys
import tarfile

import numpy as np
from PIL import Image

SPLIT_FILES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}
META_FILE = "batches.meta"
IMAGE_SHAPE = (3, 32, 32)  # each row of "data" is the R, G, then B plane, row-major


def _numpy_reconstruct():
    # numpy 2 moved the module that pickles of numpy 1 arrays refer to.
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(module)._reconstruct
        except (ImportError, AttributeError):
            continue
    raise ImportError("cannot find numpy's array pickle reconstructor")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals found in the official batches."""

    def find_class(self, module, name):
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy", "ndarray"): lambda: np.ndarray,
            ("numpy", "dtype"): lambda: np.dtype,
            # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(text, "latin1").
            ("_codecs", "encode"): lambda: importlib.import_module("_codecs").encode,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: it is not part of the official "
                f"CIFAR-10 python batches, so this file was not made by the CIFAR "
                f"authors. Download cifar-10-python.tar.gz again."
            )
        return allowed[(module, name)]()


def load_batch(data, name):
    """Unpickle one batch file's bytes into a dict with str keys.

    :param data: the file's bytes.
    :param name: the file's name, used in error messages.
    """
    try:
        raw = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"{name} is not a readable CIFAR-10 python batch: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{name} should hold a dict, found {type(raw).__name__}.")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


def batch_images(batch, name):
    """(N, 32, 32, 3) uint8 images and (N,) int64 labels of one unpickled batch."""
    missing = {"data", "labels"} - set(batch)
    if missing:
        raise ValueError(f"{name} lacks the keys {sorted(missing)}; found {sorted(batch)}.")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != np.prod(IMAGE_SHAPE):
        raise ValueError(
            f"{name}: expected 'data' as uint8 rows of 3072 values, got "
            f"{data.dtype} {data.shape}."
        )
    if labels.shape != (len(data),):
        raise ValueError(f"{name}: {len(data)} images but {labels.shape} labels.")
    return data.reshape(-1, *IMAGE_SHAPE).transpose(0, 2, 3, 1), labels


class _BatchSource:
    """Reads batch files by name from the archive or from a folder."""

    def __init__(self, path):
        self.path = path
        self.files = {}
        if os.path.isdir(path):
            for root, _, names in os.walk(path):
                for file_name in names:
                    self.files.setdefault(file_name, os.path.join(root, file_name))
            self.tar = None
        elif os.path.isfile(path):
            try:
                self.tar = tarfile.open(path, "r:*")
            except tarfile.TarError as error:
                raise ValueError(
                    f"{path} is not a tar archive ({error}); pass cifar-10-python.tar.gz "
                    f"or the folder of its extracted batches."
                ) from None
            for member in self.tar.getmembers():
                if member.isfile():
                    self.files.setdefault(os.path.basename(member.name), member)
        else:
            raise FileNotFoundError(
                f"no CIFAR-10 archive or folder at {path}; download cifar-10-python.tar.gz "
                f"from https://www.cs.toronto.edu/~kriz/cifar.html"
            )

    def read(self, file_name):
        if file_name not in self.files:
            raise FileNotFoundError(
                f"{self.path} has no {file_name}; expected the python version of "
                f"CIFAR-10 (data_batch_1..5, test_batch, batches.meta)."
            )
        entry = self.files[file_name]
        if self.tar is None:
            with open(entry, "rb") as f:
                return f.read()
        return self.tar.extractfile(entry).read()


def class_names(source):
    """The ten class names from ``batches.meta``, in label order."""
    meta = load_batch(source.read(META_FILE), META_FILE)
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
    if not names or any("_" in n or os.sep in n for n in names):
        raise ValueError(f"{META_FILE}: unusable label_names {names!r}.")
    return names


def convert(source_path, out_dir, splits=("train", "test")):
    """Write the chosen splits as PNGs; returns {split folder: number of images}."""
    source = _BatchSource(source_path)
    names = class_names(source)
    counts = {}
    for split in splits:
        folder = os.path.join(out_dir, split)
        os.makedirs(folder, exist_ok=True)
        index = 0
        for file_name in SPLIT_FILES[split]:
            images, labels = batch_images(load_batch(source.read(file_name), file_name), file_name)
            if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
                raise ValueError(
                    f"{file_name}: label {int(labels.max())} outside the {len(names)} "
                    f"classes of {META_FILE}."
                )
            for image, label in zip(images, labels):
                Image.fromarray(image).save(os.path.join(folder, f"{names[label]}_{index:05d}.png"))
                index += 1
        counts[folder] = index
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0].replace("\n", " "))
    parser.add_argument("source", help="cifar-10-python.tar.gz or the folder of its extracted batches")
    parser.add_argument("out_dir", help="folder that receives train/ and test/")
    parser.add_argument(
        "--splits", default="train,test",
        help="comma-separated splits to write, from train,test (default %(default)s)",
    )
    args = parser.parse_args(argv)
    splits = [s for s in args.splits.split(",") if s]
    unknown = [s for s in splits if s not in SPLIT_FILES]
    if unknown or not splits:
        parser.error(f"--splits {args.splits!r}: choose from train,test.")
    try:
        counts = convert(args.source, args.out_dir, splits)
    except (OSError, ValueError) as error:
        print(f"cifar10.py: {error}", file=sys.stderr)
        return 1
    for folder, count in counts.items():
        print(f"wrote {count} images to {os.path.abspath(folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
