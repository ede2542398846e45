"""Our evaluator against the original's classes (restated in numpy) on identical activations."""

import numpy as np
import pytest
import torch

import original_evaluator as original
from evaluations.evaluator import Evaluator
from evaluations.inception import spatial_features
from evaluations.metrics import DistanceBlock

torch.set_num_threads(1)

N = 2000  # the acceptance size for precision/recall: results within 1/N of the original
DIM = 64  # pool features have 2048 dims; 64 keeps the k-NN blocks quick on CPUs (2048: marked slow)
# The float16 arithmetic must give the original's numbers on the GPU too (skipped without one).
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


def _pool_like(seed, n, d=DIM, shift=0.0):
    """Non-negative correlated features with squared norms of ~600 (as Inception pool
    features), where float16's spacing (0.25 to 0.5) decides k-NN ties."""
    rng = np.random.RandomState(seed)
    mixing = np.random.RandomState(100).standard_normal((d, d)) / np.sqrt(d)
    return (np.abs(rng.standard_normal((n, d)) @ mixing + shift) * 3 * np.sqrt(DIM / d)).astype(np.float32)


# -- precision / recall ----------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_float16_distance_blocks_equal_the_originals_op_by_op(device):
    u, v = _pool_like(2, 300), _pool_like(3, 200, shift=0.2)
    ours = DistanceBlock(device).pairwise_distances(u, v)
    np.testing.assert_array_equal(ours, original.pairwise_distances(u, v))
    exact = ((u[:, None].astype(np.float64) - v[None]) ** 2).sum(-1)
    assert np.abs(ours - exact).max() > 0.1  # float16 rounding is really in play
    self_distances = np.diag(DistanceBlock(device).pairwise_distances(u, u))
    assert (self_distances > 0).any()  # as in the original, |u|^2 - 2 u.u + |u|^2 need not vanish


def test_float16_overflow_falls_back_to_float32_like_the_original():
    big = _pool_like(4, 20) * 40  # squared norms ~1e6, beyond float16's 65504
    ours = DistanceBlock("cpu").pairwise_distances(big, big[:7])
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, original.pairwise_distances(big, big[:7]), rtol=1e-5, atol=0.5)


@pytest.mark.parametrize(
    "device, dim",
    [("cpu", DIM), pytest.param("cuda", DIM, marks=NEEDS_CUDA), pytest.param("cpu", 2048, marks=pytest.mark.slow)],
)
def test_default_precision_recall_are_the_originals_within_1_over_n(device, dim):
    ref, sample = _pool_like(0, N, d=dim), _pool_like(1, N, d=dim, shift=0.3)
    expected = original.precision_recall(ref, sample)
    ours = Evaluator(device=device).compute_prec_recall(ref, sample)  # the evaluator's defaults
    assert abs(ours[0] - expected[0]) <= 1 / N and abs(ours[1] - expected[1]) <= 1 / N
    assert 0.005 < expected[0] < 0.995 and 0.005 < expected[1] < 0.995

    # --exact (float64 distances) is a documented deviation: on these features it
    # moves the scores by more than 1/N, which is why it is not the default.
    exact = Evaluator(device=device, exact=True).compute_prec_recall(ref, sample)
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
