"""Metric maths on arrays of features: FID/sFID, Inception Score, precision/recall.

Nothing here knows about images or the Inception network; every function takes
feature arrays (numpy, one row per image) so that the maths can be checked on
synthetic data and reused with any feature extractor.

Numeric conventions follow OpenAI's ADM evaluator (guided-diffusion,
``evaluations/evaluator.py``), so that scores are comparable with the papers:

* FID statistics: ``mu = mean(acts)`` in the activations' dtype and
  ``sigma = cov(acts)`` in float64; the Frechet distance uses a float64 matrix
  square root (Heusel et al. 2017, "GANs trained by a two time-scale update rule").
* Inception Score: mean over splits of ``exp(mean_x KL(p(y|x) || p(y)))``
  (Salimans et al. 2016), splits of 5000 images.
* Precision/recall: k-nearest-neighbour hyperspheres (Kynkaanniemi et al. 2019,
  "Improved precision and recall metric"), k = 3, squared Euclidean distances
  with the original's float16 arithmetic (on every device), in float32 when
  float16 overflows, in blocks of 10000 x 10000; float64 on request.
"""

import warnings
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import linalg

__all__ = [
    "InvalidFIDException",
    "FIDStatistics",
    "compute_statistics",
    "inception_score",
    "softmax",
    "DistanceBlock",
    "ManifoldEstimator",
]


class InvalidFIDException(Exception):
    """Kept for code written against the original evaluator (it defined this name)."""


# ---------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------


class FIDStatistics:
    """Mean and covariance of a set of features (one Gaussian fitted to them).

    :param mu: [D] mean of the features.
    :param sigma: [D x D] covariance of the features.
    """

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        self.mu = mu
        self.sigma = sigma

    def frechet_distance(self, other: "FIDStatistics", eps: float = 1e-6) -> float:
        """Frechet distance between this Gaussian and ``other``.

        ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` with the square
        root taken by ``scipy.linalg.sqrtm`` in float64. When the product is
        numerically singular (non-finite root), ``eps`` is added to both diagonals
        and the root is taken again; a complex root whose diagonal has an
        imaginary part above 1e-3 raises ``ValueError``, a smaller one is dropped.
        """
        mu1, mu2 = np.atleast_1d(self.mu), np.atleast_1d(other.mu)
        sigma1, sigma2 = np.atleast_2d(self.sigma), np.atleast_2d(other.sigma)
        if mu1.shape != mu2.shape:
            raise ValueError(
                f"FID needs two feature means of the same length, got {mu1.shape} and "
                f"{mu2.shape}: compare statistics from the same feature layer "
                "(pool features with pool features, spatial with spatial)."
            )
        if sigma1.shape != sigma2.shape:
            raise ValueError(
                f"FID needs two covariances of the same shape, got {sigma1.shape} and "
                f"{sigma2.shape}: compare statistics from the same feature layer."
            )

        diff = mu1 - mu2
        covmean = _sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(
                f"FID: the product of the covariances is singular; adding {eps} to "
                "their diagonals (more images give better-conditioned covariances)."
            )
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))

        # Round-off can leave a tiny imaginary part; a large one means the
        # covariances are not valid (not positive semi-definite).
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                worst = np.max(np.abs(covmean.imag))
                raise ValueError(
                    f"Imaginary component {worst} in the matrix square root of the "
                    "covariance product: the statistics are not valid covariances "
                    "(check that sigma/sigma_s are symmetric positive semi-definite)."
                )
            covmean = covmean.real

        return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """scipy's matrix square root, silent about its (large) error estimate."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return linalg.sqrtm(matrix)


def compute_statistics(activations: np.ndarray) -> FIDStatistics:
    """Fit a Gaussian to ``activations`` [N x D]: mean in their dtype, float64 covariance."""
    activations = np.asarray(activations)
    if activations.ndim != 2 or activations.shape[0] < 2:
        raise ValueError(
            "FID statistics need a 2-D array of at least 2 feature rows, got shape "
            f"{activations.shape}: pass one flattened feature vector per image."
        )
    mu = np.mean(activations, axis=0)
    sigma = np.cov(activations, rowvar=False)
    return FIDStatistics(mu, sigma)


# ---------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, in the dtype of ``logits``."""
    shifted = logits - np.max(logits, axis=1, keepdims=True)
    expd = np.exp(shifted)
    return expd / np.sum(expd, axis=1, keepdims=True)


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """Inception Score of class probabilities ``probs`` [N x classes].

    The rows are cut into consecutive splits of ``split_size`` (the last one may
    be shorter); each split scores ``exp(mean_x KL(p(y|x) || p(y)))`` with
    ``p(y)`` the split's mean prediction, and the result is the mean over splits.
    Zero probabilities contribute zero (``0 log 0 = 0``) instead of NaN.
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(
            f"inception_score needs class probabilities of shape [N, classes], got "
            f"{probs.shape}."
        )
    if split_size < 1:
        raise ValueError(f"split_size must be a positive number of images, got {split_size}.")
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        marginal = np.mean(part, axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(marginal))
        kl = np.where(part > 0, kl, 0).astype(part.dtype, copy=False)
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


# ---------------------------------------------------------------------------
# k-NN manifolds: precision and recall
# ---------------------------------------------------------------------------


def _squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances [len(u) x len(v)], clamped at 0, in u's dtype."""
    norm_u = (u * u).sum(dim=1, keepdim=True)
    norm_v = (v * v).sum(dim=1, keepdim=True).T
    return torch.clamp(norm_u - 2 * (u @ v.T) + norm_v, min=0.0)


def _half(x: torch.Tensor) -> torch.Tensor:
    """Round float32 ``x`` to the nearest float16 value (inf beyond 65504), kept in float32."""
    return x.half().float()


def _half_(x: torch.Tensor) -> torch.Tensor:
    """``_half`` in place on a float32 tensor of one's own; returns it."""
    return x.copy_(x.half())


def _squared_distances_float16(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The original's float16 distance block ``max(|u|^2 - 2 u.v + |v|^2, 0)``, in float32 storage.

    The original's TF graph casts both blocks to float16; ``tf.square`` rounds each
    square to float16, ``reduce_sum`` and ``matmul`` accumulate in float32 (on the
    GPU) and round once, and the doubling, subtraction, addition and maximum are
    float16 operations. Each of those roundings is made here explicitly on float32
    tensors: float32 holds every float16 value and product exactly, and rounding
    a float32 sum or difference of two float16 values to float16 gives the
    correctly rounded float16 result (24 >= 2 * 11 + 2 bits), so the numbers are
    the float16 ones on any device, without slow float16 kernels on CPUs.
    """
    u, v = _half(u), _half(v)
    norm_u = _half(_half(u * u).sum(dim=1, keepdim=True))
    norm_v = _half(_half(v * v).sum(dim=1, keepdim=True)).T
    dist = _half_(u @ v.T)  # the block rounded in place: no float16/float32 copies of it
    _half_(dist.mul_(-2))  # exact, but overflows to -inf where float16 would
    _half_(dist.add_(norm_u))
    _half_(dist.add_(norm_v))
    return dist.clamp_(min=0.0)


DISTANCE_DTYPES = ("float16", "float32", "float64")


class DistanceBlock:
    """Pairwise squared distances between two blocks of feature vectors.

    :param device: torch device for the arithmetic (default: CUDA when available).
    :param dtype: ``"float16"`` (default): the original's arithmetic, float16
                  distances recomputed in float32 when float16 overflows
                  anywhere in the block (see ``_squared_distances_float16``);
                  ``"float32"``: float32 throughout; ``"float64"``: exact
                  distances (``--exact``). Only ``"float16"`` reproduces the
                  original's precision and recall: the float16 rounding of
                  distances near the k-NN radii decides ties at ~1/1000 relative.
    """

    def __init__(self, device=None, dtype: str = "float16"):
        if dtype not in DISTANCE_DTYPES:
            raise ValueError(f"distance dtype must be one of {DISTANCE_DTYPES}, got {dtype!r}.")
        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = dtype
        self._torch_dtype = torch.float64 if dtype == "float64" else torch.float32

    def _tensor(self, array) -> torch.Tensor:
        if isinstance(array, torch.Tensor):
            return array.to(self.device, self._torch_dtype)
        return torch.as_tensor(np.asarray(array), device=self.device).to(self._torch_dtype)

    def distances(self, u, v) -> torch.Tensor:
        """Squared distances on ``self.device``: float64 for ``"float64"``, else float32."""
        u, v = self._tensor(u), self._tensor(v)
        if self.dtype == "float16":
            dist = _squared_distances_float16(u, v)
            if torch.isfinite(dist).all():
                return dist
        return _squared_distances(u, v)

    def pairwise_distances(self, U, V) -> np.ndarray:
        """[len(U) x len(V)] numpy array of squared distances (float64 for ``"float64"``, else float32)."""
        return self.distances(U, V).cpu().numpy()

    def less_thans(self, batch_1, radii_1, batch_2, radii_2) -> Tuple[np.ndarray, np.ndarray]:
        """Which vectors of each batch fall inside a hypersphere of the other.

        :return: ``(batch_1_in [n1 x K2], batch_2_in [n2 x K1])`` boolean arrays;
                 ``batch_1_in[i, k]`` is true when some ``j`` has
                 ``d(i, j) <= radii_2[j, k]``, and symmetrically.
        """
        dist = self.distances(batch_1, batch_2)[..., None]
        r1, r2 = self._tensor(radii_1), self._tensor(radii_2)
        batch_1_in = (dist <= r2[None]).any(dim=1)
        batch_2_in = (dist <= r1[:, None]).any(dim=0)
        return batch_1_in.cpu().numpy(), batch_2_in.cpu().numpy()


class ManifoldEstimator:
    """k-nearest-neighbour manifolds of feature vectors (improved precision/recall).

    Each reference vector gets a hypersphere whose squared radius is the squared
    distance to its k-th nearest neighbour (the vector itself not counted); a
    vector lies "on the manifold" when it falls inside any hypersphere.

    :param device: torch device for the distance blocks (default: CUDA when available).
    :param row_batch_size: rows per distance block (memory/speed trade-off).
    :param col_batch_size: columns per distance block.
    :param nhood_sizes: the k values, one radius column per k.
    :param clamp_to_percentile: when set, radii above this percentile (per k)
                                are set to 0, pruning outlier hyperspheres.
    :param eps: added to distances in the realism score, against division by 0.
    :param dtype: arithmetic of the distances, see ``DistanceBlock`` (default
                  ``"float16"``, the original's).
    """

    def __init__(
        self,
        device=None,
        row_batch_size: int = 10000,
        col_batch_size: int = 10000,
        nhood_sizes: Sequence[int] = (3,),
        clamp_to_percentile: Optional[float] = None,
        eps: float = 1e-5,
        dtype: str = "float16",
    ):
        if row_batch_size < 1 or col_batch_size < 1:
            raise ValueError(
                f"row_batch_size and col_batch_size must be positive, got "
                f"{row_batch_size} and {col_batch_size}."
            )
        self.distance_block = DistanceBlock(device, dtype=dtype)
        self.row_batch_size = row_batch_size
        self.col_batch_size = col_batch_size
        self.nhood_sizes = tuple(int(k) for k in nhood_sizes)
        self.num_nhoods = len(self.nhood_sizes)
        self.clamp_to_percentile = clamp_to_percentile
        self.eps = eps

    def _row_distances(self, rows, columns) -> torch.Tensor:
        """Distances from ``rows`` to every vector of ``columns``, built column block by block."""
        blocks = [
            self.distance_block.distances(rows, columns[start : start + self.col_batch_size])
            for start in range(0, len(columns), self.col_batch_size)
        ]
        return torch.cat(blocks, dim=1)

    def manifold_radii(self, features: np.ndarray) -> np.ndarray:
        """[N x len(nhood_sizes)] squared k-NN radii of ``features`` [N x D].

        float32 as in the original (float64 with ``dtype="float64"``); with
        float16 distances a vector's distance to itself need not be 0, and it
        stays among the candidates as the original's ``np.partition`` keeps it.
        """
        num = len(features)
        largest_k = max(self.nhood_sizes)
        if num <= largest_k:
            raise ValueError(
                f"k-NN radii with k={largest_k} need more than {largest_k} feature "
                f"vectors, got {num}: use more images or smaller nhood_sizes."
            )
        features = self.distance_block._tensor(features)
        exact = self.distance_block.dtype == "float64"
        radii = np.zeros([num, self.num_nhoods], dtype=np.float64 if exact else np.float32)
        for start in range(0, num, self.row_batch_size):
            dist = self._row_distances(features[start : start + self.row_batch_size], features)
            # Position k of the sorted row: the vector itself takes one of the first k + 1.
            nearest = torch.topk(dist, largest_k + 1, dim=1, largest=False).values
            radii[start : start + len(dist)] = nearest[:, list(self.nhood_sizes)].cpu().numpy()

        if self.clamp_to_percentile is not None:
            max_distances = np.percentile(radii, self.clamp_to_percentile, axis=0)
            radii[radii > max_distances] = 0
        return radii

    def evaluate(self, features: np.ndarray, radii: np.ndarray, eval_features: np.ndarray) -> Dict:
        """Which of ``eval_features`` lie on the manifold of (``features``, ``radii``).

        :return: dict with ``fraction`` (mean over vectors and k of being inside),
                 ``batch_predictions`` [M x K] int32 (1 = inside),
                 ``max_realism_score`` [M] float32 (max over references of
                 radius / (distance + eps); also under the original's misspelled
                 key ``max_realisim_score``) and ``nearest_indices`` [M] int32.
        """
        num_eval = len(eval_features)
        ref = self.distance_block._tensor(features)
        radii_t = self.distance_block._tensor(radii)
        predictions = np.zeros([num_eval, self.num_nhoods], dtype=np.int32)
        realism = np.zeros([num_eval], dtype=np.float32)
        nearest = np.zeros([num_eval], dtype=np.int32)
        for start in range(0, num_eval, self.row_batch_size):
            stop = min(start + self.row_batch_size, num_eval)
            dist = self._row_distances(eval_features[start:stop], ref)
            predictions[start:stop] = (dist[:, :, None] <= radii_t[None]).any(dim=1).cpu().numpy()
            realism[start:stop] = (radii_t[None, :, 0] / (dist + self.eps)).max(dim=1).values.cpu().numpy()
            nearest[start:stop] = dist.argmin(dim=1).cpu().numpy()
        return {
            "fraction": float(np.mean(predictions)),
            "batch_predictions": predictions,
            "max_realism_score": realism,
            "max_realisim_score": realism,
            "nearest_indices": nearest,
        }

    def evaluate_pr(
        self,
        features_1: np.ndarray,
        radii_1: np.ndarray,
        features_2: np.ndarray,
        radii_2: np.ndarray,
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Precision and recall of set 2 (samples) against set 1 (reference).

        :param features_1: [N1 x D] reference vectors; ``radii_1`` [N1 x K1] their radii.
        :param features_2: [N2 x D] sample vectors; ``radii_2`` [N2 x K2] their radii.
        :return: ``(precision [K1], recall [K2])`` float64: precision is the fraction
                 of samples inside the reference manifold, recall the fraction of
                 references inside the sample manifold.
        """
        status_1 = np.zeros([len(features_1), radii_2.shape[1]], dtype=bool)
        status_2 = np.zeros([len(features_2), radii_1.shape[1]], dtype=bool)
        for begin_1 in range(0, len(features_1), self.row_batch_size):
            end_1 = begin_1 + self.row_batch_size
            for begin_2 in range(0, len(features_2), self.col_batch_size):
                end_2 = begin_2 + self.col_batch_size
                in_1, in_2 = self.distance_block.less_thans(
                    features_1[begin_1:end_1],
                    radii_1[begin_1:end_1],
                    features_2[begin_2:end_2],
                    radii_2[begin_2:end_2],
                )
                status_1[begin_1:end_1] |= in_1
                status_2[begin_2:end_2] |= in_2
        return (
            np.mean(status_2.astype(np.float64), axis=0),
            np.mean(status_1.astype(np.float64), axis=0),
        )


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
