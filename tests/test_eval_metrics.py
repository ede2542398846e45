"""Metric maths of the evaluation suite, against independent computations."""

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from evaluations import metrics
from evaluations.metrics import (
    DistanceBlock,
    FIDStatistics,
    ManifoldEstimator,
    compute_statistics,
    inception_score,
)

torch.set_num_threads(1)


def _random_gaussian_features(seed, n, d, shift=0.0):
    rng = np.random.RandomState(seed)
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    return (rng.standard_normal((n, d)) @ mixing + shift).astype(np.float32)


# -- Frechet distance ---------------------------------------------------------


def test_frechet_distance_matches_direct_scipy_formula():
    a = compute_statistics(_random_gaussian_features(0, 400, 16))
    b = compute_statistics(_random_gaussian_features(1, 300, 16, shift=0.3))
    root = scipy.linalg.sqrtm(a.sigma @ b.sigma).real
    expected = np.sum((a.mu.astype(np.float64) - b.mu) ** 2) + np.trace(a.sigma + b.sigma - 2 * root)
    assert a.frechet_distance(b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_diagonal_gaussians_has_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    fid = FIDStatistics(mu1, np.diag(var1)).frechet_distance(FIDStatistics(mu2, np.diag(var2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert fid == pytest.approx(expected, abs=1e-10)


def test_frechet_distance_of_identical_statistics_is_zero():
    stats = compute_statistics(_random_gaussian_features(2, 200, 8))
    assert abs(stats.frechet_distance(stats)) < 1e-8


def test_frechet_distance_is_symmetric():
    a = compute_statistics(_random_gaussian_features(3, 200, 8))
    b = compute_statistics(_random_gaussian_features(4, 200, 8, shift=1.0))
    assert a.frechet_distance(b) == pytest.approx(b.frechet_distance(a), rel=1e-8)


def test_frechet_distance_adds_eps_to_diagonals_when_root_is_not_finite(monkeypatch):
    seen = []

    def fake_sqrtm(matrix):
        seen.append(matrix.copy())
        return np.full_like(matrix, np.inf) if len(seen) == 1 else np.eye(len(matrix))

    monkeypatch.setattr(metrics, "_sqrtm", fake_sqrtm)
    sigma = np.diag([2.0, 3.0])
    with pytest.warns(UserWarning, match="adding 0.5"):
        fid = FIDStatistics(np.zeros(2), sigma).frechet_distance(FIDStatistics(np.zeros(2), sigma), eps=0.5)
    np.testing.assert_allclose(seen[1], (sigma + 0.5 * np.eye(2)) @ (sigma + 0.5 * np.eye(2)))
    assert fid == pytest.approx(2 * 5.0 - 2 * 2.0)


def test_frechet_distance_refuses_large_imaginary_parts(monkeypatch):
    monkeypatch.setattr(metrics, "_sqrtm", lambda m: np.eye(len(m)) * (1 + 0.1j))
    with pytest.raises(ValueError, match="Imaginary component"):
        FIDStatistics(np.zeros(2), np.eye(2)).frechet_distance(FIDStatistics(np.zeros(2), np.eye(2)))


def test_frechet_distance_drops_small_imaginary_parts(monkeypatch):
    monkeypatch.setattr(metrics, "_sqrtm", lambda m: np.eye(len(m)) * (1 + 1e-5j))
    fid = FIDStatistics(np.zeros(2), np.eye(2)).frechet_distance(FIDStatistics(np.zeros(2), np.eye(2)))
    assert isinstance(fid, float) and fid == pytest.approx(0.0)


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="same length"):
        FIDStatistics(np.zeros(3), np.eye(3)).frechet_distance(FIDStatistics(np.zeros(4), np.eye(4)))


def test_statistics_keep_mean_dtype_and_use_float64_unbiased_covariance():
    acts = _random_gaussian_features(5, 50, 6)
    stats = compute_statistics(acts)
    centred = acts.astype(np.float64) - acts.astype(np.float64).mean(axis=0)
    assert stats.mu.dtype == np.float32 and stats.sigma.dtype == np.float64
    np.testing.assert_allclose(stats.sigma, centred.T @ centred / (len(acts) - 1), rtol=1e-6, atol=1e-9)


def test_statistics_need_two_rows():
    with pytest.raises(ValueError, match="at least 2"):
        compute_statistics(np.zeros((1, 5), dtype=np.float32))


# -- Inception Score ------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(np.full((100, 10), 0.1)) == pytest.approx(1.0)


def test_inception_score_of_confident_predictions_spread_over_k_classes_is_k():
    logits = np.full((60, 1008), -60.0, dtype=np.float32)
    logits[np.arange(60), np.arange(60) % 12] = 60.0
    assert inception_score(metrics.softmax(logits)) == pytest.approx(12.0, rel=1e-5)


def test_inception_score_averages_over_splits_of_split_size():
    one_hot = np.zeros((30, 5))
    one_hot[np.arange(20), np.arange(20) % 5] = 1.0  # first 20 rows: 5 classes
    one_hot[20:, 0] = 1.0  # last 10 rows: one class
    assert inception_score(one_hot, split_size=20) == pytest.approx((5.0 + 1.0) / 2)


def test_inception_score_matches_scipy_entropy_on_random_predictions():
    probs = metrics.softmax(np.random.RandomState(6).standard_normal((40, 7)) * 3)
    marginal = probs.mean(axis=0)
    expected = np.exp(np.mean([scipy.stats.entropy(p, marginal) for p in probs]))
    assert inception_score(probs) == pytest.approx(expected, rel=1e-10)


def test_inception_score_treats_zero_probabilities_as_zero_terms():
    probs = np.eye(4)[[0, 1, 2, 3, 0, 1]]
    assert np.isfinite(inception_score(probs))


# -- precision / recall -----------------------------------------------------------


def _brute_squared_distances(a, b):
    return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)


def _brute_radii(features, k):
    return np.sort(_brute_squared_distances(features, features), axis=1)[:, k]


def _integer_features(seed, n, d, high=6, offset=0):
    # Small integers give exact squared distances even in float16.
    return (np.random.RandomState(seed).randint(0, high, size=(n, d)) + offset).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_manifold_radii_are_kth_neighbour_squared_distances(dtype):
    feats = _integer_features(7, 45, 6)
    est = ManifoldEstimator("cpu", row_batch_size=16, col_batch_size=7, nhood_sizes=(1, 3), dtype=dtype)
    radii = est.manifold_radii(feats)
    assert radii.dtype == (np.float64 if dtype == "float64" else np.float32) and radii.shape == (45, 2)
    np.testing.assert_array_equal(radii[:, 0], _brute_radii(feats, 1))
    np.testing.assert_array_equal(radii[:, 1], _brute_radii(feats, 3))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_precision_recall_match_brute_force_nearest_neighbours(dtype):
    ref = _integer_features(8, 50, 6)
    sample = _integer_features(9, 37, 6, high=7, offset=1)
    est = ManifoldEstimator("cpu", row_batch_size=13, col_batch_size=11, dtype=dtype)
    precision, recall = est.evaluate_pr(ref, est.manifold_radii(ref), sample, est.manifold_radii(sample))

    dist = _brute_squared_distances(ref, sample)  # [ref, sample]
    expected_precision = np.mean((dist <= _brute_radii(ref, 3)[:, None]).any(axis=0))
    expected_recall = np.mean((dist <= _brute_radii(sample, 3)[None, :]).any(axis=1))
    assert precision.shape == (1,) and recall.shape == (1,)
    assert precision[0] == expected_precision and recall[0] == expected_recall
    assert 0 < precision[0] < 1 and 0 < recall[0] < 1  # the data exercises both outcomes


def test_block_sizes_do_not_change_precision_recall():
    ref = _random_gaussian_features(10, 70, 12)
    sample = _random_gaussian_features(11, 55, 12, shift=0.4)
    results = []
    for rows, cols in [(10000, 10000), (8, 5), (1, 70)]:
        est = ManifoldEstimator("cpu", row_batch_size=rows, col_batch_size=cols, dtype="float32")
        results.append(est.evaluate_pr(ref, est.manifold_radii(ref), sample, est.manifold_radii(sample)))
    for precision, recall in results[1:]:
        assert precision[0] == results[0][0][0] and recall[0] == results[0][1][0]


def test_evaluate_reports_membership_realism_and_nearest_reference():
    ref = _integer_features(12, 30, 5)
    queries = _integer_features(13, 20, 5, high=8)
    est = ManifoldEstimator("cpu", row_batch_size=6, col_batch_size=9, dtype="float32")
    radii = est.manifold_radii(ref)
    out = est.evaluate(ref, radii, queries)

    dist = _brute_squared_distances(queries, ref)  # [query, ref]
    inside = (dist <= radii[None, :, 0]).any(axis=1)
    np.testing.assert_array_equal(out["batch_predictions"][:, 0], inside.astype(np.int32))
    assert out["fraction"] == pytest.approx(inside.mean())
    np.testing.assert_array_equal(out["nearest_indices"], dist.argmin(axis=1))
    np.testing.assert_allclose(out["max_realism_score"], (radii[None, :, 0] / (dist + 1e-5)).max(axis=1), rtol=1e-6)
    assert out["max_realisim_score"] is out["max_realism_score"]  # the original's key


def test_clamp_to_percentile_zeroes_radii_above_the_percentile():
    feats = _random_gaussian_features(14, 40, 4)
    plain = ManifoldEstimator("cpu", dtype="float32").manifold_radii(feats)
    clamped = ManifoldEstimator("cpu", clamp_to_percentile=50, dtype="float32").manifold_radii(feats)
    limit = np.percentile(plain, 50, axis=0)
    np.testing.assert_array_equal(clamped, np.where(plain > limit, 0, plain))
    assert (clamped == 0).sum() == (plain > limit).sum() > 0


def test_float16_distances_fall_back_to_float32_on_overflow():
    big = _random_gaussian_features(15, 6, 8) * 1000  # squared norms far above float16's 65504
    dist = DistanceBlock("cpu", dtype="float16").pairwise_distances(big, big[:4])
    assert np.isfinite(dist).all()
    # |a|^2 + |b|^2 - 2ab in float32: a few ulps of the squared norms (~1e7 here), which
    # depend on the CPU's matmul kernel.
    ulp = np.finfo(np.float32).eps * float((big.astype(np.float64) ** 2).sum(axis=1).max())
    np.testing.assert_allclose(dist, _brute_squared_distances(big, big[:4]), rtol=1e-4, atol=8 * ulp)


def test_less_thans_flags_vectors_inside_the_other_sets_spheres():
    a = np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32)
    b = np.array([[1.0, 0.0], [20.0, 0.0], [10.0, 2.0]], dtype=np.float32)
    a_in, b_in = DistanceBlock("cpu", dtype="float32").less_thans(
        a, np.array([[1.0], [0.5]]), b, np.array([[0.5], [0.5], [4.0]])
    )
    np.testing.assert_array_equal(a_in[:, 0], [False, True])  # a[1] is 4 from b[2], radius 4
    np.testing.assert_array_equal(b_in[:, 0], [True, False, False])  # b[0] is 1 from a[0], radius 1


def test_manifold_radii_need_more_vectors_than_k():
    with pytest.raises(ValueError, match="k=3"):
        ManifoldEstimator("cpu").manifold_radii(np.zeros((3, 4), dtype=np.float32))


def test_float16_distances_are_the_default_on_every_device():
    assert DistanceBlock("cpu").dtype == "float16" and DistanceBlock("cuda").dtype == "float16"
    assert ManifoldEstimator("cpu").distance_block.dtype == "float16"


def test_unknown_distance_dtype_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="float16.*float32.*float64.*'half'"):
        DistanceBlock("cpu", dtype="half")
