"""Our evaluator against the original's classes (restated in numpy) on identical activations."""

import numpy as np
import pytest
import torch

import original_evaluator as original
from evaluations.evaluator import Evaluator
from evaluations.inception import spatial_features
from evaluations.metrics import DistanceBlock, ManifoldEstimator

torch.set_num_threads(1)

N = 2000  # the acceptance size for precision/recall: results within 1/N of the original
DIM = 64  # pool features have 2048 dims; 64 keeps the k-NN blocks quick on CPUs


def _pool_like(seed, n, d=DIM, shift=0.0):
    """Non-negative correlated features whose squared distances (~500) sit where float16's
    spacing (0.25 to 0.5) decides k-NN ties, as for Inception pool features."""
    rng = np.random.RandomState(seed)
    mixing = np.random.RandomState(100).standard_normal((d, d)) / np.sqrt(d)
    return (np.abs(rng.standard_normal((n, d)) @ mixing + shift) * 3).astype(np.float32)


@pytest.fixture(scope="module")
def pr_features():
    return _pool_like(0, N), _pool_like(1, N, shift=0.3)


def _our_precision_recall(ref, sample, dtype="float16"):
    est = ManifoldEstimator("cpu", dtype=dtype)
    precision, recall = est.evaluate_pr(ref, est.manifold_radii(ref), sample, est.manifold_radii(sample))
    return precision[0], recall[0]


# -- precision / recall ----------------------------------------------------------


def test_float16_distance_blocks_equal_the_originals_op_by_op():
    u, v = _pool_like(2, 300), _pool_like(3, 200, shift=0.2)
    ours = DistanceBlock("cpu").pairwise_distances(u, v)
    np.testing.assert_array_equal(ours, original.pairwise_distances(u, v))
    exact = ((u[:, None].astype(np.float64) - v[None]) ** 2).sum(-1)
    assert np.abs(ours - exact).max() > 0.1  # float16 rounding is really in play
    self_distances = np.diag(DistanceBlock("cpu").pairwise_distances(u, u))
    assert (self_distances > 0).any()  # as in the original, |u|^2 - 2 u.u + |u|^2 need not vanish


def test_float16_overflow_falls_back_to_float32_like_the_original():
    big = _pool_like(4, 20) * 40  # squared norms ~1e6, beyond float16's 65504
    ours = DistanceBlock("cpu").pairwise_distances(big, big[:7])
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, original.pairwise_distances(big, big[:7]), rtol=1e-5, atol=0.5)


def test_default_precision_recall_are_the_originals_within_1_over_n(pr_features):
    ref, sample = pr_features
    expected = original.precision_recall(ref, sample)
    ours = _our_precision_recall(ref, sample)
    assert abs(ours[0] - expected[0]) <= 1 / N and abs(ours[1] - expected[1]) <= 1 / N
    assert 0.1 < expected[0] < 0.9 and 0.1 < expected[1] < 0.9


def test_exact_precision_recall_deviate_from_the_original(pr_features):
    # --exact (float64 distances) is a documented deviation: it moves the scores
    # by more than 1/N on these features, which is why it is not the default.
    ref, sample = pr_features
    expected = original.precision_recall(ref, sample)
    exact = _our_precision_recall(ref, sample, dtype="float64")
    assert max(abs(exact[0] - expected[0]), abs(exact[1] - expected[1])) > 1 / N


# -- FID and sFID ------------------------------------------------------------------


def _feature_maps(seed, n, shift=0.0):
    """[n, 9, 4, 4] NCHW maps whose mean and noise depend on channel and position."""
    rng = np.random.RandomState(seed)
    pattern = np.random.RandomState(200).uniform(0, 2, size=(9, 4, 4))
    scale = np.linspace(0.5, 2.0, 9)[:, None, None]
    maps = pattern + shift + scale * rng.standard_normal((n, 9, 4, 4)) ** 2
    return maps.astype(np.float32)


def _ours(maps):
    return spatial_features(torch.from_numpy(maps)).numpy()


def _originals(maps):
    return original.spatial_from_nhwc(maps.transpose(0, 2, 3, 1))  # TF hands the map over as NHWC


def _relative_error(ours, expected):
    return abs(ours - expected) / abs(expected)


@pytest.mark.parametrize("kind", ["pool", "spatial"])
def test_fid_of_computed_statistics_is_the_originals(kind):
    if kind == "pool":
        ref, sample = _pool_like(5, 400, d=24), _pool_like(6, 300, d=24, shift=0.4)
        ours_ref, ours_sample, orig_ref, orig_sample = ref, sample, ref, sample
    else:
        ref, sample = _feature_maps(7, 400), _feature_maps(8, 300, shift=0.3)
        ours_ref, ours_sample = _ours(ref), _ours(sample)
        orig_ref, orig_sample = _originals(ref), _originals(sample)
    evaluator = Evaluator(device="cpu")
    ours = evaluator.compute_statistics(ours_sample).frechet_distance(evaluator.compute_statistics(ours_ref))
    expected = original.frechet_distance(
        original.compute_statistics(orig_sample), original.compute_statistics(orig_ref)
    )
    assert _relative_error(ours, expected) < 1e-6


def _reference_batch(path, maps, pool):
    """A reference batch whose statistics were computed the original's way."""
    mu, sigma = original.compute_statistics(pool)
    mu_s, sigma_s = original.compute_statistics(_originals(maps))
    np.savez(path, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)


def test_fid_and_sfid_against_precomputed_statistics_are_the_originals(tmp_path):
    ref_maps, sample_maps = _feature_maps(9, 500), _feature_maps(10, 300, shift=0.3)
    ref_pool, sample_pool = _pool_like(11, 500, d=24), _pool_like(12, 300, d=24, shift=0.4)
    _reference_batch(tmp_path / "ref.npz", ref_maps, ref_pool)
    evaluator = Evaluator(device="cpu")
    ref_stats, ref_stats_s = evaluator.read_statistics(str(tmp_path / "ref.npz"), (None, None))
    sample_stats = evaluator.compute_statistics(sample_pool)
    sample_stats_s = evaluator.compute_statistics(_ours(sample_maps))

    stored = np.load(tmp_path / "ref.npz")
    expected_fid = original.frechet_distance(original.compute_statistics(sample_pool), (stored["mu"], stored["sigma"]))
    expected_sfid = original.frechet_distance(
        original.compute_statistics(_originals(sample_maps)), (stored["mu_s"], stored["sigma_s"])
    )
    assert _relative_error(sample_stats.frechet_distance(ref_stats), expected_fid) < 1e-6
    assert _relative_error(sample_stats_s.frechet_distance(ref_stats_s), expected_sfid) < 1e-6


def test_sfid_flattened_channel_major_disagrees_with_the_originals_statistics(tmp_path):
    # The check above fails for a (c, h, w) flattening: against statistics stored in
    # the original's (h, w, c) layout it scores a very different sFID.
    ref_maps, sample_maps = _feature_maps(9, 500), _feature_maps(10, 300, shift=0.3)
    _reference_batch(tmp_path / "ref.npz", ref_maps, _pool_like(11, 500, d=24))
    _, ref_stats_s = Evaluator(device="cpu").read_statistics(str(tmp_path / "ref.npz"), (None, None))
    channel_major = sample_maps[:, :7].reshape(len(sample_maps), -1)
    wrong = Evaluator(device="cpu").compute_statistics(channel_major).frechet_distance(ref_stats_s)
    right = Evaluator(device="cpu").compute_statistics(_ours(sample_maps)).frechet_distance(ref_stats_s)
    assert wrong > 3 * right
