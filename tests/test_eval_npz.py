"""Reading batch files: streaming arr_0 and the precomputed-statistics path."""

import numpy as np
import pytest

from evaluations.evaluator import Evaluator
from evaluations.metrics import compute_statistics
from evaluations.npz_io import (
    MemoryNpzArrayReader,
    StreamingNpzArrayReader,
    open_npz_array,
    read_precomputed_statistics,
)


def _images(seed, n, size=16):
    return np.random.RandomState(seed).randint(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "compressed"])
def test_large_npz_streams_in_batches_equal_to_the_whole_array(tmp_path, save):
    images = _images(0, 3001, size=24)  # ~5 MB
    path = tmp_path / "batch.npz"
    save(path, images, np.arange(3001))
    with open_npz_array(str(path), "arr_0") as reader:
        assert isinstance(reader, StreamingNpzArrayReader)
        batches = reader.read_batches(256)
        assert len(batches) == 12
        chunks = list(batches)
    assert [len(c) for c in chunks] == [256] * 11 + [185]
    np.testing.assert_array_equal(np.concatenate(chunks), images)


def test_streaming_reader_reports_remaining_rows(tmp_path):
    path = tmp_path / "batch.npz"
    np.savez(path, _images(1, 10))
    with open_npz_array(str(path), "arr_0") as reader:
        reader.read_batch(4)
        assert reader.remaining() == 6
        assert len(reader.read_batch(100)) == 6
        assert reader.read_batch(1) is None


def test_fortran_ordered_arrays_fall_back_to_memory(tmp_path):
    images = np.asfortranarray(_images(2, 7))
    path = tmp_path / "fortran.npz"
    np.savez(path, images)
    with open_npz_array(str(path), "arr_0") as reader:
        assert isinstance(reader, MemoryNpzArrayReader)
        np.testing.assert_array_equal(np.concatenate(list(reader.read_batches(3))), images)


def test_missing_member_names_what_the_file_holds(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, images=_images(3, 2))
    with pytest.raises(ValueError, match=r"missing arr_0 .*images"):
        with open_npz_array(str(path), "arr_0"):
            pass


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        with open_npz_array(str(tmp_path / "nowhere.npz"), "arr_0"):
            pass


def test_precomputed_statistics_replace_computed_ones(tmp_path):
    rng = np.random.RandomState(4)
    stored = {
        "mu": rng.standard_normal(5),
        "sigma": np.eye(5) * 2,
        "mu_s": rng.standard_normal(3),
        "sigma_s": np.eye(3) * 3,
    }
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=_images(5, 4), **stored)
    activations = (rng.standard_normal((10, 5)), rng.standard_normal((10, 3)))
    pool, spatial = Evaluator(device="cpu").read_statistics(str(path), activations)
    np.testing.assert_array_equal(pool.mu, stored["mu"])
    np.testing.assert_array_equal(pool.sigma, stored["sigma"])
    np.testing.assert_array_equal(spatial.mu, stored["mu_s"])
    np.testing.assert_array_equal(spatial.sigma, stored["sigma_s"])


def test_statistics_are_computed_when_the_batch_has_none(tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, _images(6, 4))
    rng = np.random.RandomState(7)
    activations = (rng.standard_normal((10, 5)).astype(np.float32), rng.standard_normal((10, 3)).astype(np.float32))
    assert read_precomputed_statistics(str(path)) is None
    pool, spatial = Evaluator(device="cpu").read_statistics(str(path), activations)
    np.testing.assert_array_equal(pool.sigma, compute_statistics(activations[0]).sigma)
    np.testing.assert_array_equal(spatial.mu, compute_statistics(activations[1]).mu)


def test_partial_precomputed_statistics_are_refused(tmp_path):
    path = tmp_path / "broken.npz"
    np.savez(path, arr_0=_images(8, 2), mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match=r"lacks \['mu_s', 'sigma_s'\]"):
        read_precomputed_statistics(str(path))


def test_precomputed_and_recomputed_statistics_give_the_same_fid(tmp_path):
    rng = np.random.RandomState(9)
    ref_acts = rng.standard_normal((60, 6)).astype(np.float32)
    sample_acts = (rng.standard_normal((50, 6)) + 0.5).astype(np.float32)
    ref_stats = compute_statistics(ref_acts)
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=_images(10, 2), mu=ref_stats.mu, sigma=ref_stats.sigma, mu_s=ref_stats.mu, sigma_s=ref_stats.sigma)
    stored_pool, _ = Evaluator(device="cpu").read_statistics(str(path), (ref_acts, ref_acts))
    sample_stats = compute_statistics(sample_acts)
    assert sample_stats.frechet_distance(stored_pool) == pytest.approx(sample_stats.frechet_distance(ref_stats), rel=1e-12)
