"""make_reference.py and the activations cache, with a random-weight Inception network."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from evaluations import inception, make_reference
from evaluations.activations import ActivationsCache, network_fingerprint
from evaluations.evaluator import Evaluator
from evaluations.inception import InceptionV3

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return InceptionV3().eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory, net):
    path = tmp_path_factory.mktemp("weights") / inception.WEIGHTS_FILENAME
    torch.save(net.state_dict(), path)
    return path


def _images(seed, n, size=16):
    return np.random.RandomState(seed).randint(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _run_make_reference(monkeypatch, weights, *args):
    monkeypatch.setenv(inception.ALLOW_UNVERIFIED_ENV, "1")
    argv = [*map(str, args), "--inception_weights", str(weights), "--device", "cpu", "--batch_size", "4"]
    with pytest.warns(UserWarning, match="NOT comparable"):
        make_reference.main(argv)


# -- make_reference.py -----------------------------------------------------------------


def test_reference_of_a_folder_has_the_statistics_the_evaluator_computes(tmp_path, net, weights, monkeypatch):
    images = _images(0, 6)
    (tmp_path / "images" / "sub").mkdir(parents=True)
    for i, image in enumerate(images):  # sorted names; one in a subfolder, found recursively
        Image.fromarray(image).save(tmp_path / "images" / ("sub" if i == 5 else "") / f"img_{i}.png")
    _run_make_reference(monkeypatch, weights, tmp_path / "images", tmp_path / "ref.npz", "--arr_0_size", "4")

    np.savez(tmp_path / "same_images.npz", images)
    evaluator = Evaluator(net, batch_size=4, device="cpu", progress=False)
    acts = evaluator.read_activations(str(tmp_path / "same_images.npz"))
    expected = evaluator.read_statistics(str(tmp_path / "same_images.npz"), acts)
    with np.load(tmp_path / "ref.npz") as ref:
        for stats, (mu, sigma) in zip(expected, [("mu", "sigma"), ("mu_s", "sigma_s")]):
            np.testing.assert_array_equal(ref[mu], stats.mu)
            np.testing.assert_array_equal(ref[sigma], stats.sigma)
        assert ref["arr_0"].shape == (4, 16, 16, 3) and ref["arr_0"].dtype == np.uint8
        kept = [next(i for i in range(6) if np.array_equal(row, images[i])) for row in ref["arr_0"]]
        assert kept == sorted(set(kept))  # distinct images, in the source's order


def test_reference_of_an_npz_keeps_every_image_when_there_are_fewer_than_arr_0_size(tmp_path, net, weights, monkeypatch):
    images = _images(1, 5)
    np.savez(tmp_path / "source.npz", images)
    _run_make_reference(monkeypatch, weights, tmp_path / "source.npz", tmp_path / "ref.npz")
    pool, _ = Evaluator(net, batch_size=4, device="cpu", progress=False).read_activations(str(tmp_path / "source.npz"))
    with np.load(tmp_path / "ref.npz") as ref:
        np.testing.assert_array_equal(ref["arr_0"], images)
        np.testing.assert_allclose(ref["mu"], pool.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_folder_images_of_different_sizes_ask_for_image_size(tmp_path):
    (tmp_path / "mixed").mkdir()
    Image.fromarray(_images(2, 1)[0]).save(tmp_path / "mixed" / "a.png")
    Image.fromarray(_images(3, 1, size=20)[0]).save(tmp_path / "mixed" / "b.png")
    batches, num = make_reference.folder_batches(str(tmp_path / "mixed"), batch_size=4)
    with pytest.raises(ValueError, match=r"b.png is 20x20 but the first image is 16x16: pass --image_size"):
        list(batches)
    batches, _ = make_reference.folder_batches(str(tmp_path / "mixed"), image_size=8, batch_size=4)
    assert [b.shape for b in batches] == [(2, 8, 8, 3)]


def test_make_reference_reports_a_missing_source_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["make_reference.py"])
    with pytest.raises(SystemExit) as exit_info:
        make_reference.run_main(make_reference.main, [str(tmp_path / "absent"), str(tmp_path / "ref.npz")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "absent is neither an image folder nor an .npz" in err


# -- activations cache -------------------------------------------------------------------


class _Refusing(InceptionV3):
    """A network that must not be run: the activations have to come from the cache."""

    def forward(self, images):
        raise AssertionError("the network ran although the activations were cached")


def test_cached_activations_are_reused_for_the_same_content_under_any_name(tmp_path, net):
    np.savez(tmp_path / "batch.npz", _images(4, 3))
    first = Evaluator(net, device="cpu", progress=False, cache_dir=str(tmp_path / "cache"))
    computed = first.read_activations(str(tmp_path / "batch.npz"))
    assert len(list((tmp_path / "cache").iterdir())) == 1

    shutil.copy(tmp_path / "batch.npz", tmp_path / "copy.npz")
    refusing = _Refusing()
    refusing.load_state_dict(net.state_dict())
    second = Evaluator(refusing, device="cpu", progress=False, cache_dir=str(tmp_path / "cache"))
    for got, want in zip(second.read_activations(str(tmp_path / "copy.npz")), computed):
        np.testing.assert_array_equal(got, want)


def test_a_rewritten_file_misses_the_cache_and_gets_its_own_activations(tmp_path, net):
    path = tmp_path / "batch.npz"
    cached = Evaluator(net, device="cpu", progress=False, cache_dir=str(tmp_path / "cache"))
    np.savez(path, _images(5, 2))
    cached.read_activations(str(path))
    np.savez(path, _images(6, 2))  # same name, new content
    got = cached.read_activations(str(path))
    want = Evaluator(net, device="cpu", progress=False).read_activations(str(path))
    for got_part, want_part in zip(got, want):
        np.testing.assert_array_equal(got_part, want_part)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_other_weights_miss_the_cache(tmp_path, net):
    path = tmp_path / "batch.npz"
    np.savez(path, _images(5, 2))
    cache = ActivationsCache(str(tmp_path / "cache"), net)

    other = InceptionV3()
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        other.fc.bias[0] += 1.0
    assert network_fingerprint(other) != network_fingerprint(net)
    assert ActivationsCache(str(tmp_path / "cache"), other).path_for(str(path)) != cache.path_for(str(path))
