"""
Score class-conditional samples of the digits demo.

A support-vector classifier is trained on scikit-learn's bundled handwritten
digits (1,797 real 8x8 images, no download). Samples are brought back to 8x8
the same way ``datasets/digits.py`` blew the digits up (the inverse of the
export), and the check reports which share of them the classifier recognises
as the class they were sampled for, overall and per class.

Usable on its own::

    python -m guided_diffusion.digits_check samples_100x16x16x3.npz

where the ``.npz`` holds ``arr_0`` (uint8 images, NHWC or NHW) and ``arr_1``
(the requested labels 0..9), as written by ``scripts/image_sample.py`` for a
class-conditional model. The exit status is 0 when the share reaches
``--threshold``, 1 when it does not, 2 when the input cannot be read.

The pixel conversions between the digits' 8x8 grid and exported images live
here, in one place, so the export and the check cannot drift apart.
"""

import argparse
import sys
import zipfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

NUM_DIGIT_CLASSES = 10
DIGIT_SIZE = 8  # scikit-learn's digits are 8x8 ...
DIGIT_LEVELS = 16  # ... with integer intensities 0..16 (16 = full ink)
HOLDOUT_FRACTION = 0.25  # share of the real digits kept out to measure the classifier
SPLIT_SEED = 0  # fixed, so the classifier (and its accuracy) is the same every run
DEFAULT_THRESHOLD = 0.8  # the demo's acceptance bar for the recognised share


# ----------------------------------------------------------------- pixel maths


def digit_levels_to_uint8(levels):
    """Map the digits' 0..16 intensities to 0..255 (ink is bright on black).

    :param levels: array of any shape with values in [0, 16].
    :return: uint8 array of the same shape.
    """
    levels = np.asarray(levels, dtype=np.float64)
    return np.rint(levels * (255.0 / DIGIT_LEVELS)).astype(np.uint8)


def digit_to_image(digit, image_size, rgb=False):
    """Blow one 8x8 uint8 digit up to ``image_size`` pixels (the export).

    Upscaling uses bicubic interpolation, the filter ``image_datasets`` uses for
    resizing, so strokes stay smooth; ``image_size == 8`` keeps the pixels as is.

    :param digit: uint8 array of shape (8, 8).
    :param image_size: side of the square output image, at least 8.
    :param rgb: return an RGB image (three equal channels) instead of grayscale.
    :return: a PIL image of mode "L" or "RGB".
    """
    digit = np.asarray(digit)
    if digit.shape != (DIGIT_SIZE, DIGIT_SIZE) or digit.dtype != np.uint8:
        raise ValueError(
            f"digit_to_image expects one uint8 array of shape (8, 8), got "
            f"{digit.dtype} {digit.shape}; convert with digit_levels_to_uint8 first."
        )
    if image_size < DIGIT_SIZE:
        raise ValueError(
            f"image_size={image_size} is smaller than the digits' own 8x8 grid; "
            f"pass --image_size 8 or larger."
        )
    image = Image.fromarray(digit)  # uint8 2-D -> mode "L"
    if image_size != DIGIT_SIZE:
        image = image.resize((image_size, image_size), resample=Image.BICUBIC)
    return image.convert("RGB") if rgb else image


def images_to_digit_features(images):
    """Bring exported or sampled images back to the digits' 8x8 grid.

    The inverse of :func:`digit_to_image`: channels are averaged to gray, then
    the image is area-averaged (PIL's BOX filter) down to 8x8.

    :param images: uint8 array NHWC (C = 1 or 3) or NHW.
    :return: float64 array of shape (N, 64) with values in [0, 1].
    """
    images = _as_nhw_gray(images)
    features = np.empty((len(images), DIGIT_SIZE * DIGIT_SIZE), dtype=np.float64)
    for i, gray in enumerate(images):
        if gray.shape != (DIGIT_SIZE, DIGIT_SIZE):
            small = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32))  # mode "F"
            small = small.resize((DIGIT_SIZE, DIGIT_SIZE), resample=Image.BOX)
            gray = np.asarray(small, dtype=np.float32)
        features[i] = gray.reshape(-1) / 255.0
    return features


def _as_nhw_gray(images):
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.astype(np.float32).mean(axis=-1)
    elif images.ndim == 3:
        images = images.astype(np.float32)
    else:
        raise ValueError(
            f"expected images as NHWC with 1 or 3 channels (or NHW), got shape "
            f"{images.shape}; image_sample.py writes NHWC uint8 arrays as arr_0."
        )
    if images.shape[1] != images.shape[2] or images.shape[1] < DIGIT_SIZE:
        raise ValueError(
            f"expected square images of at least 8x8 pixels, got "
            f"{images.shape[1]}x{images.shape[2]}."
        )
    return images


# ----------------------------------------------------------------- real digits


def load_real_digits():
    """The 1,797 real digits as uint8 images (N, 8, 8) and int64 labels (N,)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = digit_levels_to_uint8(bunch.images)
    return images, bunch.target.astype(np.int64)


def holdout_split(labels, fraction=HOLDOUT_FRACTION, seed=SPLIT_SEED):
    """Deterministic stratified split of indices into (train, held_out).

    Within each class the indices are shuffled with ``numpy.random.RandomState(seed)``
    and the first ``round(fraction * n_class)`` are held out. Both index arrays
    are sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}.")
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    held_out = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        held_out.extend(members[: int(round(fraction * len(members)))])
    held_out = np.sort(np.asarray(held_out, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), held_out)
    return train, held_out


def exported_digit_features(image_size, indices=None):
    """Features of the real digits after the export round trip at ``image_size``.

    The classifier trains on exactly what samples look like after
    :func:`images_to_digit_features`, so upscaling artefacts cancel out.
    """
    images, labels = load_real_digits()
    if indices is not None:
        images, labels = images[indices], labels[indices]
    if image_size == DIGIT_SIZE:
        exported = images
    else:
        exported = np.stack([np.asarray(digit_to_image(d, image_size)) for d in images])
    return images_to_digit_features(exported), labels


@dataclass
class DigitClassifier:
    """A scikit-learn classifier of 8x8 digit features, with its held-out accuracy."""

    model: object
    heldout_accuracy: float
    image_size: int

    def predict(self, images):
        """Predicted digit (int64, shape (N,)) for uint8 images NHWC or NHW."""
        return self.model.predict(images_to_digit_features(images)).astype(np.int64)


def train_digit_classifier(image_size=DIGIT_SIZE):
    """Fit the reference classifier on the real digits (deterministic).

    An RBF support-vector machine trained on 75% of the digits, exported and
    read back at ``image_size``; its accuracy on the other 25% is kept in
    ``heldout_accuracy`` (about 0.99).
    """
    from sklearn.svm import SVC

    _, labels = load_real_digits()
    train_idx, test_idx = holdout_split(labels)
    x_train, y_train = exported_digit_features(image_size, train_idx)
    x_test, y_test = exported_digit_features(image_size, test_idx)
    model = SVC(C=10.0, gamma="scale").fit(x_train, y_train)
    accuracy = float(np.mean(model.predict(x_test) == y_test))
    return DigitClassifier(model=model, heldout_accuracy=accuracy, image_size=image_size)


# ----------------------------------------------------------------- the check


@dataclass
class DigitsCheckResult:
    """How many class-conditional samples were recognised as their requested class."""

    share: float  # recognised / all samples
    per_class: dict = field(default_factory=dict)  # label -> (count, recognised share)
    num_samples: int = 0
    classifier_accuracy: float = 0.0  # the classifier's accuracy on held-out real digits
    threshold: float = DEFAULT_THRESHOLD

    @property
    def passed(self):
        """True when the overall share reaches the threshold."""
        return self.share >= self.threshold

    @property
    def exit_code(self):
        return 0 if self.passed else 1

    @property
    def spread(self):
        """(lowest, highest) per-class share over the classes that were sampled."""
        shares = [share for _, share in self.per_class.values()]
        return (min(shares), max(shares)) if shares else (float("nan"), float("nan"))

    def format_table(self):
        """A small plain-text report: one row per class, then the summary."""
        lines = ["class  samples  recognised"]
        for label in sorted(self.per_class):
            count, share = self.per_class[label]
            lines.append(f"{label:>5}  {count:>7}  {share:>9.1%}")
        low, high = self.spread
        lines.append(
            f"recognised as requested class: {self.share:.1%} of {self.num_samples} "
            f"samples (per class {low:.0%}..{high:.0%}; "
            f"{'PASS' if self.passed else 'FAIL'} at >= {self.threshold:.0%})"
        )
        lines.append(
            f"reference classifier: {self.classifier_accuracy:.1%} accurate on "
            f"held-out real digits"
        )
        return "\n".join(lines)


def check_samples(images, labels, threshold=DEFAULT_THRESHOLD, classifier=None):
    """Score class-conditional digit samples.

    :param images: uint8 array NHWC (C = 1 or 3) or NHW, square, at least 8x8.
    :param labels: the requested classes, integers 0..9, one per image.
    :param threshold: share needed for ``result.passed``.
    :param classifier: a :class:`DigitClassifier`; trained on the fly when None.
    :return: a :class:`DigitsCheckResult`.
    """
    images = np.asarray(images)
    labels = _validate_labels(labels, len(images) if images.ndim else 0)
    if images.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 images (0..255), got dtype {images.dtype}; convert "
            f"samples with ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8) first."
        )
    image_size = _as_nhw_gray(images[:1]).shape[1]
    if classifier is None:
        classifier = train_digit_classifier(image_size)
    predicted = classifier.predict(images)
    hits = predicted == labels
    per_class = {
        int(label): (int(np.sum(labels == label)), float(np.mean(hits[labels == label])))
        for label in np.unique(labels)
    }
    return DigitsCheckResult(
        share=float(np.mean(hits)),
        per_class=per_class,
        num_samples=len(labels),
        classifier_accuracy=classifier.heldout_accuracy,
        threshold=threshold,
    )


def _validate_labels(labels, num_images):
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != num_images or num_images == 0:
        raise ValueError(
            f"expected one label per image: {num_images} images but labels of shape "
            f"{labels.shape}."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers 0..9, got dtype {labels.dtype}.")
    bad = labels[(labels < 0) | (labels >= NUM_DIGIT_CLASSES)]
    if len(bad):
        raise ValueError(
            f"labels must be digit classes 0..9, got {int(bad[0])}; sample with a "
            f"model trained on the digits (class_cond True) and labels below 10."
        )
    return labels.astype(np.int64)


def check_npz(path, threshold=DEFAULT_THRESHOLD):
    """Run :func:`check_samples` on an ``image_sample.py`` output file."""
    try:
        with np.load(path) as data:
            if "arr_0" not in data or "arr_1" not in data:
                raise ValueError(
                    f"{path} holds {sorted(data.files)}, but the check needs arr_0 "
                    f"(images) and arr_1 (requested labels): sample from a "
                    f"class-conditional model (--class_cond True)."
                )
            images, labels = data["arr_0"], data["arr_1"]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no samples file at {path}; pass the samples_*.npz written by "
            f"scripts/image_sample.py."
        ) from None
    return check_samples(images, labels, threshold=threshold)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Share of class-conditional digit samples a classifier trained "
        "on the real digits recognises as their requested class."
    )
    parser.add_argument("samples", help="samples .npz with arr_0 (uint8 NHWC) and arr_1 (labels)")
    parser.add_argument(
        "--threshold", type=float, default=DEFAULT_THRESHOLD,
        help="recognised share needed for exit status 0 (default %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        result = check_npz(args.samples, threshold=args.threshold)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        print(f"digits_check: {error}", file=sys.stderr)
        return 2
    print(result.format_table())
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
