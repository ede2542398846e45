"""The original ADM evaluator's metric classes, restated in plain numpy for the tests.

OpenAI's ``evaluations/evaluator.py`` (guided-diffusion) needs TensorFlow; this
module re-states, independently of ``evaluations/``, what its classes compute on
feature arrays, op by op, so that our evaluator can be checked against it on
identical activations:

* ``spatial_from_nhwc``: ``mixed_6/conv`` is an NHWC tensor; the original keeps
  ``[..., :7]`` and reshapes each image to one row, i.e. (h, w, c) order.
* ``compute_statistics`` / ``frechet_distance``: ``np.mean``, ``np.cov`` and
  ``scipy.linalg.sqrtm`` as the original calls them.
* ``DistanceBlock``: the TF graph casts both feature blocks to float16 and runs
  ``D = max(|u|^2 - 2 u.v + |v|^2, 0)`` in float16: ``tf.square`` rounds each
  square to float16, ``tf.reduce_sum`` and ``tf.matmul`` accumulate in float32 on
  the GPU and round their result to float16 once, and the scaling by 2, the
  subtraction, the addition and the maximum are float16 operations. If any
  entry of the block is not finite (float16 overflows at 65504) the block is
  recomputed from the float32 features in float32. The block is returned cast to
  float32 and compared with float32 radii.
* ``ManifoldEstimator``: radii are the k-th smallest entries of each row's
  distances (``np.partition``; the vector's own distance is among them),
  stored as float32; ``evaluate_pr`` runs over blocks of 10000 x 10000.

Numpy's float16 arithmetic converts to float32, operates and rounds back, which is
the correctly rounded float16 result for these operations.
"""

import numpy as np
from scipy import linalg


def spatial_from_nhwc(feature_map_nhwc):
    """The original's sFID rows from an [N, H, W, C] ``mixed_6/conv`` map."""
    kept = feature_map_nhwc[..., :7]
    return kept.reshape([kept.shape[0], -1])


def compute_statistics(activations):
    return np.mean(activations, axis=0), np.cov(activations, rowvar=False)


def frechet_distance(stats_1, stats_2, eps=1e-6):
    (mu1, sigma1), (mu2, sigma2) = stats_1, stats_2
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))  # the original passes disp=False: same root, no print
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def _pairwise_float16(u, v):
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    norm_u = np.sum((u16 * u16).astype(np.float32), axis=1).astype(np.float16).reshape([-1, 1])
    norm_v = np.sum((v16 * v16).astype(np.float32), axis=1).astype(np.float16).reshape([1, -1])
    inner = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.maximum(norm_u - np.float16(2) * inner + norm_v, np.float16(0))


def _pairwise_float32(u, v):
    u, v = u.astype(np.float32), v.astype(np.float32)
    norm_u = np.sum(u * u, axis=1).reshape([-1, 1])
    norm_v = np.sum(v * v, axis=1).reshape([1, -1])
    return np.maximum(norm_u - 2 * (u @ v.T) + norm_v, np.float32(0))


def pairwise_distances(u, v):
    """The original's ``DistanceBlock.pairwise_distances``: float16 first, float32 on overflow."""
    block = _pairwise_float16(u, v)
    if np.isfinite(block).all():
        return block.astype(np.float32)
    return _pairwise_float32(u, v)


def manifold_radii(features, nhood_sizes=(3,), row_batch_size=10000, col_batch_size=10000):
    num = len(features)
    radii = np.zeros([num, len(nhood_sizes)], dtype=np.float32)
    seq = np.arange(max(nhood_sizes) + 1)
    for begin_1 in range(0, num, row_batch_size):
        end_1 = min(begin_1 + row_batch_size, num)
        rows = np.zeros([end_1 - begin_1, num], dtype=np.float32)
        for begin_2 in range(0, num, col_batch_size):
            end_2 = min(begin_2 + col_batch_size, num)
            rows[:, begin_2:end_2] = pairwise_distances(features[begin_1:end_1], features[begin_2:end_2])
        radii[begin_1:end_1] = np.partition(rows, seq, axis=1)[:, list(nhood_sizes)]
    return radii


def evaluate_pr(features_1, radii_1, features_2, radii_2, row_batch_size=10000, col_batch_size=10000):
    """``(precision [K1], recall [K2])`` of set 2 against reference set 1."""
    status_1 = np.zeros([len(features_1), radii_2.shape[1]], dtype=bool)
    status_2 = np.zeros([len(features_2), radii_1.shape[1]], dtype=bool)
    for begin_1 in range(0, len(features_1), row_batch_size):
        end_1 = begin_1 + row_batch_size
        for begin_2 in range(0, len(features_2), col_batch_size):
            end_2 = begin_2 + col_batch_size
            dist = pairwise_distances(features_1[begin_1:end_1], features_2[begin_2:end_2])[..., None]
            status_1[begin_1:end_1] |= np.any(dist <= radii_2[begin_2:end_2], axis=1)
            status_2[begin_2:end_2] |= np.any(dist <= radii_1[begin_1:end_1][:, None], axis=0)
    return np.mean(status_2, axis=0, dtype=np.float64), np.mean(status_1, axis=0, dtype=np.float64)


def precision_recall(ref_features, sample_features):
    """What the original's ``Evaluator.compute_prec_recall`` returns."""
    radii_ref = manifold_radii(ref_features)
    radii_sample = manifold_radii(sample_features)
    precision, recall = evaluate_pr(ref_features, radii_ref, sample_features, radii_sample)
    return float(precision[0]), float(recall[0])
