"""Dataset preparation scripts (datasets/cifar10.py, datasets/lsun_bedroom.py) on generated inputs."""

import importlib.util
import io
import os
import pickle
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_script(name):
    """Import datasets/<name>.py (the folder is not a package, to keep `datasets` free)."""
    spec = importlib.util.spec_from_file_location(f"_prep_{name}", os.path.join(REPO, "datasets", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cifar10 = load_script("cifar10")


# ------------------------------------------------------------------- CIFAR-10


def fake_batch(rng, n):
    """A batch dict in the official layout: bytes keys, uint8 rows of R, G, B planes."""
    return {
        b"batch_label": b"fake batch",
        b"labels": [int(v) for v in rng.randint(0, 10, n)],
        b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }


def write_fake_cifar(folder, per_batch=3, seed=0):
    """Write data_batch_1..5, test_batch and batches.meta as protocol-2 pickles."""
    rng = np.random.RandomState(seed)
    os.makedirs(folder, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = fake_batch(rng, per_batch)
    meta = {b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_cases_per_batch": per_batch}
    for name, obj in list(batches.items()) + [("batches.meta", meta)]:
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(obj, f, protocol=2)
    return batches


def expected_images(batches, names):
    """(file name -> HWC uint8) the converter should write, built independently per pixel plane."""
    out = {}
    index = 0
    for name in names:
        batch = batches[name]
        for row, label in zip(batch[b"data"], batch[b"labels"]):
            r, g, b = row[:1024], row[1024:2048], row[2048:]
            image = np.stack([r.reshape(32, 32), g.reshape(32, 32), b.reshape(32, 32)], axis=-1)
            out[f"{CIFAR_NAMES[label]}_{index:05d}.png"] = image
            index += 1
    return out


def read_folder(folder):
    return {name: np.asarray(Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))}


def test_cifar_folder_of_batches_becomes_class_prefixed_pngs(tmp_path):
    batches = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    counts = cifar10.convert(str(tmp_path / "cifar-10-batches-py"), str(tmp_path / "out"))

    assert counts == {str(tmp_path / "out" / "train"): 15, str(tmp_path / "out" / "test"): 3}
    for split, names in cifar10.SPLIT_FILES.items():
        written = read_folder(tmp_path / "out" / split)
        expected = expected_images(batches, names)
        assert sorted(written) == sorted(expected)
        for name, image in expected.items():
            np.testing.assert_array_equal(written[name], image)


def test_cifar_archive_is_read_without_extracting(tmp_path):
    batches = write_fake_cifar(tmp_path / "src" / "cifar-10-batches-py", seed=1)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")

    cifar10.convert(str(archive), str(tmp_path / "out"), splits=("test",))

    assert not (tmp_path / "out" / "train").exists()
    written = read_folder(tmp_path / "out" / "test")
    expected = expected_images(batches, ["test_batch"])
    assert sorted(written) == sorted(expected)
    for name, image in expected.items():
        np.testing.assert_array_equal(written[name], image)


def test_cifar_file_names_sort_to_the_official_label_numbers():
    # load_data maps sorted class names to 0..N-1; CIFAR's own order is already sorted.
    assert sorted(CIFAR_NAMES) == CIFAR_NAMES


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    write_fake_cifar(tmp_path / "batches")
    with open(tmp_path / "batches" / "test_batch", "wb") as f:
        pickle.dump({b"data": _RunsCode(), b"labels": []}, f, protocol=2)

    with pytest.raises(ValueError, match="refusing to load .*system"):
        cifar10.convert(str(tmp_path / "batches"), str(tmp_path / "out"), splits=("test",))


def test_cifar_missing_batch_names_the_file(tmp_path):
    write_fake_cifar(tmp_path / "batches")
    os.remove(tmp_path / "batches" / "data_batch_3")

    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        cifar10.convert(str(tmp_path / "batches"), str(tmp_path / "out"))


def test_cifar_missing_source_points_to_the_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        cifar10.convert(str(tmp_path / "nowhere"), str(tmp_path / "out"))


def test_cifar_batch_with_wrong_row_length_is_reported(tmp_path):
    write_fake_cifar(tmp_path / "batches")
    with open(tmp_path / "batches" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)

    with pytest.raises(ValueError, match="3072"):
        cifar10.convert(str(tmp_path / "batches"), str(tmp_path / "out"), splits=("test",))


def test_cifar_cli_writes_and_reports_counts(tmp_path, capsys):
    write_fake_cifar(tmp_path / "batches", per_batch=2)

    assert cifar10.main([str(tmp_path / "batches"), str(tmp_path / "out"), "--splits", "test"]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "out" / "test")) == 2


# ------------------------------------------------------------------- LSUN


def encoded(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_lsun_export_resizes_and_centre_crops_like_training(tmp_path):
    lmdb = pytest.importorskip("lmdb", reason="the optional lmdb package is not installed (pip install lmdb)")
    image_datasets = pytest.importorskip("guided_diffusion.image_datasets")
    lsun = load_script("lsun_bedroom")
    rng = np.random.RandomState(0)
    # Wide image with a red centre and blue sides; a tall one; one small enough to be upscaled.
    wide = np.zeros((40, 120, 3), np.uint8)
    wide[:, :] = (0, 0, 255)
    wide[:, 40:80] = (255, 0, 0)
    sources = [
        Image.fromarray(wide),
        Image.fromarray(rng.randint(0, 256, (90, 50, 3)).astype(np.uint8)),
        Image.fromarray(rng.randint(0, 256, (10, 12, 3)).astype(np.uint8)),
    ]
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, (image, fmt) in enumerate(zip(sources, ["PNG", "PNG", "WEBP"])):
            txn.put(f"{i:04d}".encode(), encoded(image, fmt))
    env.close()

    count = lsun.export(str(tmp_path / "db"), str(tmp_path / "out"), image_size=16)

    assert count == 3
    assert sorted(os.listdir(tmp_path / "out")) == [f"bedroom_{i:07d}.png" for i in range(3)]
    first = np.asarray(Image.open(tmp_path / "out" / "bedroom_0000000.png"))
    assert first.shape == (16, 16, 3)
    assert np.all(first[:, 4:12, 0] > 200) and np.all(first[:, 4:12, 2] < 50)  # the red centre survives
    decoded = Image.open(io.BytesIO(encoded(sources[1], "PNG"))).convert("RGB")
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "out" / "bedroom_0000001.png")),
        image_datasets.center_crop_arr(decoded, 16),
    )


def test_lsun_without_lmdb_says_how_to_install(monkeypatch, tmp_path):
    lsun = load_script("lsun_bedroom")
    monkeypatch.setitem(sys.modules, "lmdb", None)  # makes `import lmdb` fail

    with pytest.raises(ImportError, match="pip install lmdb"):
        next(lsun.iter_lmdb_images(str(tmp_path)))


def test_lsun_prefix_with_underscore_is_refused(tmp_path):
    pytest.importorskip("guided_diffusion.image_datasets")
    lsun = load_script("lsun_bedroom")
    with pytest.raises(ValueError, match="prefix"):
        lsun.export(str(tmp_path), str(tmp_path / "out"), prefix="my_bedroom")
