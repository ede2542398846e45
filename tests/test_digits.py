"""The digits dataset export (datasets/digits.py) and the sample check (guided_diffusion.digits_check)."""

import hashlib
import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from guided_diffusion import digits_check

pytest.importorskip("sklearn", reason="the digits need scikit-learn (pip install scikit-learn)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_digits_script():
    path = os.path.join(REPO, "datasets", "digits.py")
    spec = importlib.util.spec_from_file_location("_prep_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


digits = load_digits_script()


def folder_digest(folder):
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        digest.update(name.encode())
        with open(os.path.join(folder, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def read_folder(folder, mode="L"):
    names = sorted(os.listdir(folder))
    images = np.stack([np.asarray(Image.open(os.path.join(folder, n)).convert(mode)) for n in names])
    labels = np.array([int(n.split("_")[0]) for n in names])
    return names, images, labels


@pytest.fixture(scope="module")
def exported_12(tmp_path_factory):
    """The whole dataset exported once at 12x12, grayscale."""
    folder = tmp_path_factory.mktemp("digits12")
    digits.export_digits(str(folder), image_size=12)
    return str(folder)


# ------------------------------------------------------------------- export


def test_export_writes_all_1797_digits_with_their_labels(exported_12):
    from sklearn.datasets import load_digits

    names, images, labels = read_folder(exported_12)
    target = load_digits().target
    assert len(names) == 1797
    indices = np.array([int(n.split("_")[1].split(".")[0]) for n in names])
    np.testing.assert_array_equal(np.sort(indices), np.arange(1797))
    np.testing.assert_array_equal(labels, target[indices])
    assert images.shape == (1797, 12, 12)


def test_export_is_byte_identical_across_runs(exported_12, tmp_path):
    digits.export_digits(str(tmp_path), image_size=12)
    assert folder_digest(str(tmp_path)) == folder_digest(exported_12)


def test_export_at_8_keeps_the_digit_pixels(tmp_path):
    from sklearn.datasets import load_digits

    digits.export_digits(str(tmp_path), image_size=8)
    image = np.asarray(Image.open(tmp_path / "7_00017.png"))
    expected = np.rint(load_digits().images[17] * 255 / 16)
    assert load_digits().target[17] == 7
    np.testing.assert_array_equal(image, expected)


def test_class_names_sort_to_labels_0_to_9(exported_12):
    classes = sorted({n.split("_")[0] for n in os.listdir(exported_12)})
    assert classes == [str(d) for d in range(10)]


def test_rgb_export_has_three_equal_channels(tmp_path):
    digits.export_digits(str(tmp_path), image_size=8, rgb=True)
    image = Image.open(tmp_path / "0_00000.png")
    assert image.mode == "RGB"
    array = np.asarray(image)
    np.testing.assert_array_equal(array[..., 0], array[..., 2])


def test_holdout_split_is_disjoint_stratified_and_complete(tmp_path):
    counts = digits.export_digits(str(tmp_path), image_size=8, holdout_fraction=0.2)
    train = set(os.listdir(tmp_path / "train"))
    test = set(os.listdir(tmp_path / "test"))
    assert counts == {str(tmp_path / "train"): len(train), str(tmp_path / "test"): len(test)}
    assert not train & test and len(train) + len(test) == 1797
    per_class = np.bincount([int(n[0]) for n in test], minlength=10)
    assert np.all((per_class >= 34) & (per_class <= 38))  # about 20% of ~180 per class


def test_export_below_8_pixels_is_refused(tmp_path):
    with pytest.raises(ValueError, match="image_size=4"):
        digits.export_digits(str(tmp_path), image_size=4)


def test_exported_folder_loads_as_ten_classes(exported_12):
    image_datasets = pytest.importorskip("guided_diffusion.image_datasets")
    batch, cond = next(
        image_datasets.load_data(
            data_dir=exported_12, batch_size=64, image_size=12, class_cond=True,
            deterministic=True, random_flip=False,
        )
    )
    names = sorted(os.listdir(exported_12))[:64]
    assert batch.shape[-2:] == (12, 12)
    np.testing.assert_array_equal(cond["y"].numpy(), [int(n[0]) for n in names])


# ------------------------------------------------------------------- check


@pytest.fixture(scope="module")
def classifier_12():
    return digits_check.train_digit_classifier(12)


def test_conversion_round_trip_at_8_is_exact():
    images, _ = digits_check.load_real_digits()
    features = digits_check.images_to_digit_features(images[:5])
    np.testing.assert_allclose(features, images[:5].reshape(5, -1) / 255.0)


def test_classifier_is_accurate_on_held_out_digits(classifier_12):
    assert classifier_12.heldout_accuracy >= 0.97


def test_real_digits_are_recognised(exported_12, classifier_12):
    _, images, labels = read_folder(exported_12, mode="RGB")
    result = digits_check.check_samples(images, labels, classifier=classifier_12)
    assert result.share >= 0.98 and result.passed
    assert result.spread[0] >= 0.95
    assert sum(count for count, _ in result.per_class.values()) == 1797


def test_shuffled_labels_score_near_chance(exported_12, classifier_12):
    _, images, labels = read_folder(exported_12)
    shuffled = np.random.RandomState(0).permutation(labels)
    result = digits_check.check_samples(images, shuffled, classifier=classifier_12)
    assert 0.05 < result.share < 0.15 and not result.passed


def test_noise_fails_the_check(classifier_12):
    noise = np.random.RandomState(1).randint(0, 256, (200, 12, 12, 3)).astype(np.uint8)
    result = digits_check.check_samples(noise, np.arange(200) % 10, classifier=classifier_12)
    assert result.share < 0.3 and result.exit_code == 1


def test_table_lists_every_sampled_class():
    real, real_labels = digits_check.load_real_digits()
    result = digits_check.check_samples(real[:30], real_labels[:30])
    table = result.format_table()
    for label in np.unique(real_labels[:30]):
        assert f"\n{label:>5} " in table
    assert "recognised as requested class" in table


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 2]), "one label per image"),
        (np.zeros((2, 8, 8, 3), np.uint8), np.array([3, 12]), "got 12"),
        (np.zeros((2, 8, 8, 3), np.float32), np.array([3, 4]), "uint8"),
        (np.zeros((2, 8, 8, 2), np.uint8), np.array([3, 4]), "1 or 3 channels"),
        (np.zeros((2, 6, 6, 3), np.uint8), np.array([3, 4]), "at least 8x8"),
    ],
)
def test_bad_inputs_are_explained(images, labels, message):
    with pytest.raises(ValueError, match=message):
        digits_check.check_samples(images, labels)


def test_cli_exit_codes(tmp_path, capsys):
    real, labels = digits_check.load_real_digits()
    np.savez(tmp_path / "good.npz", real[:100, :, :, None], labels[:100])
    np.savez(tmp_path / "bad.npz", real[:100, :, :, None], (labels[:100] + 1) % 10)
    np.savez(tmp_path / "unlabelled.npz", real[:100, :, :, None])

    assert digits_check.main([str(tmp_path / "good.npz")]) == 0
    assert "PASS" in capsys.readouterr().out
    assert digits_check.main([str(tmp_path / "bad.npz")]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert digits_check.main([str(tmp_path / "unlabelled.npz")]) == 2
    assert "class_cond" in capsys.readouterr().err
    assert digits_check.main([str(tmp_path / "missing.npz")]) == 2
    assert "image_sample.py" in capsys.readouterr().err


def test_cli_rejects_a_file_that_is_not_npz(tmp_path, capsys):
    (tmp_path / "notes.npz").write_text("not an array file")
    assert digits_check.main([str(tmp_path / "notes.npz")]) == 2
    assert "digits_check:" in capsys.readouterr().err
