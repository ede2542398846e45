"""Score a sample batch against a reference batch: IS, FID, sFID, precision, recall.

    python evaluations/evaluator.py REF.npz SAMPLE.npz [--inception_weights PATH]
        [--batch_size 64] [--device cuda|cpu] [--cache_dir DIR] [--exact]

The command line, the printed lines and the Python surface (``Evaluator``,
``FIDStatistics``, ``ManifoldEstimator``, ``open_npz_array``) are those of
OpenAI's ADM evaluator (guided-diffusion ``evaluations/evaluator.py``); the
feature network runs in PyTorch instead of TensorFlow (``evaluations/inception.py``)
and the metric maths lives in ``evaluations/metrics.py``. docs/evaluation.md
explains where to get the reference batches and the weights.
"""

import argparse
import contextlib
import os
import sys
from typing import Iterable, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script: make the `evaluations` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluations.activations import CACHE_ENV, ActivationsCache  # noqa: E402
from evaluations.inception import (  # noqa: E402
    WEIGHTS_ENV,
    InceptionV3,
    InceptionWeightsError,
    load_inception,
)
from evaluations.metrics import (  # noqa: E402
    DistanceBlock,
    FIDStatistics,
    InvalidFIDException,
    ManifoldEstimator,
    compute_statistics,
    inception_score,
)
from evaluations.npz_io import (  # noqa: E402
    BatchIterator,
    MemoryNpzArrayReader,
    NpzArrayReader,
    StreamingNpzArrayReader,
    open_npz_array,
    read_precomputed_statistics,
)

__all__ = [
    "Evaluator",
    "FIDStatistics",
    "InvalidFIDException",
    "ManifoldEstimator",
    "DistanceBlock",
    "NpzArrayReader",
    "StreamingNpzArrayReader",
    "MemoryNpzArrayReader",
    "BatchIterator",
    "open_npz_array",
    "main",
]


@contextlib.contextmanager
def _full_float32_precision():
    """Disable TF32 while extracting features: the reference numbers were float32."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Evaluator:
    """Feature extraction and metrics over batches of images.

    :param network: an ``InceptionV3`` with loaded weights; by default it is
                    loaded from ``weights_path`` (or ``$GUIDED_DIFFUSION_INCEPTION_WEIGHTS``)
                    the first time features are needed, so the metric methods
                    work without weights.
    :param batch_size: images per forward pass.
    :param softmax_batch_size: feature rows per softmax pass (Inception Score).
    :param device: torch device (default: CUDA when available, else CPU).
    :param weights_path: the ``pt_inception-2015-12-05-6726825d.pth`` file.
    :param progress: show tqdm progress bars over batches.
    :param cache_dir: folder of the activations cache (``evaluations/activations.py``):
                      ``read_activations`` computes a file's features once;
                      None (default) caches nothing.
    :param exact: precision/recall from float64 distances instead of the
                  original's float16 arithmetic (a deviation: scores move by
                  about 1/1000; see docs/evaluation.md).
    """

    def __init__(
        self,
        network: Optional[InceptionV3] = None,
        batch_size: int = 64,
        softmax_batch_size: int = 512,
        *,
        device=None,
        weights_path: Optional[str] = None,
        progress: bool = True,
        cache_dir: Optional[str] = None,
        exact: bool = False,
    ):
        if batch_size < 1 or softmax_batch_size < 1:
            raise ValueError(
                f"batch_size and softmax_batch_size must be positive, got {batch_size} "
                f"and {softmax_batch_size} (use e.g. --batch_size 64)."
            )
        self.device = torch.device(device) if device is not None else _default_device()
        self.batch_size = batch_size
        self.softmax_batch_size = softmax_batch_size
        self.weights_path = weights_path
        self.progress = progress
        self._network = network.to(self.device).eval() if network is not None else None
        self.cache_dir = cache_dir
        self._cache = None
        self.manifold_estimator = ManifoldEstimator(self.device, dtype="float64" if exact else "float16")

    @property
    def network(self) -> InceptionV3:
        if self._network is None:
            self._network = load_inception(self.weights_path, self.device)
        return self._network

    def warmup(self) -> None:
        """Run the network once (loads the weights and initialises the device)."""
        self.compute_activations([np.zeros([1, 64, 64, 3], dtype=np.uint8)])

    # -- features ----------------------------------------------------------

    @property
    def cache(self) -> Optional[ActivationsCache]:
        """The activations cache in ``cache_dir`` (None without one); loads the network to key it."""
        if self._cache is None and self.cache_dir:
            self._cache = ActivationsCache(self.cache_dir, self.network, progress=self.progress)
        return self._cache

    def read_activations(self, npz_path: str) -> Tuple[np.ndarray, np.ndarray]:
        """``(pool [N, 2048], spatial [N, 2023])`` features of ``arr_0`` in ``npz_path``, streamed
        (or read from the activations cache when it has this file's)."""
        with open_npz_array(npz_path, "arr_0") as reader:
            entry = self.cache.path_for(npz_path) if self.cache is not None else None
            cached = self.cache.load(entry) if entry is not None else None
            if cached is not None:
                print(f"using cached activations {entry}", file=sys.stderr)
                return cached
            activations = self.compute_activations(reader.read_batches(self.batch_size))
        if entry is not None:
            self.cache.save(entry, activations)
        return activations

    @torch.no_grad()
    def compute_activations(self, batches: Iterable[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """Image features for the metrics.

        :param batches: an iterable of NHWC RGB arrays with values in [0, 255].
        :return: float32 arrays ``(pool [N, 2048], spatial [N, 2023])``.
        """
        pools, spatials = [], []
        network = self.network
        with _full_float32_precision():
            for batch in tqdm(batches, disable=not self.progress):
                images = _to_nchw_tensor(batch, self.device)
                out = network(images)
                pools.append(out.pool.cpu().numpy())
                spatials.append(out.spatial.cpu().numpy())
        if not pools:
            raise ValueError("no images to evaluate: the batch iterable was empty.")
        return np.concatenate(pools, axis=0), np.concatenate(spatials, axis=0)

    # -- statistics and metrics ---------------------------------------------

    def read_statistics(
        self, npz_path: str, activations: Tuple[np.ndarray, np.ndarray]
    ) -> Tuple[FIDStatistics, FIDStatistics]:
        """The batch's precomputed ``(mu, sigma)``, ``(mu_s, sigma_s)`` if it has them,
        else statistics of ``activations`` (pool, spatial)."""
        stored = read_precomputed_statistics(npz_path)
        if stored is not None:
            return stored
        return tuple(self.compute_statistics(x) for x in activations)

    def compute_statistics(self, activations: np.ndarray) -> FIDStatistics:
        """Mean and covariance of ``activations`` [N x D]."""
        return compute_statistics(activations)

    @torch.no_grad()
    def compute_inception_score(self, activations: np.ndarray, split_size: int = 5000) -> float:
        """Inception Score of pool features ``activations`` [N x 2048].

        Class probabilities are ``softmax(pool @ W)`` with W the classifier's
        weight and no bias, as the original evaluator computes them (it reuses
        only the ``softmax/logits/MatMul`` weight of the TF graph).
        """
        activations = np.asarray(activations, dtype=np.float32)
        weight = self.network.fc.weight
        probs = []
        for start in range(0, len(activations), self.softmax_batch_size):
            acts = torch.from_numpy(activations[start : start + self.softmax_batch_size]).to(weight.device)
            probs.append(torch.softmax(acts @ weight.T, dim=1).cpu().numpy())
        return inception_score(np.concatenate(probs, axis=0), split_size=split_size)

    def compute_prec_recall(
        self, activations_ref: np.ndarray, activations_sample: np.ndarray
    ) -> Tuple[float, float]:
        """Improved precision and recall (k=3) of the samples against the reference."""
        radii_ref = self.manifold_estimator.manifold_radii(activations_ref)
        radii_sample = self.manifold_estimator.manifold_radii(activations_sample)
        precision, recall = self.manifold_estimator.evaluate_pr(
            activations_ref, radii_ref, activations_sample, radii_sample
        )
        return float(precision[0]), float(recall[0])


def _to_nchw_tensor(batch: np.ndarray, device) -> torch.Tensor:
    batch = np.asarray(batch)
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(
            f"expected RGB images as an N x H x W x 3 array with values in [0, 255], got "
            f"shape {batch.shape}. Batches written by scripts/image_sample.py have this "
            "layout; convert grayscale images to 3 channels first."
        )
    images = torch.from_numpy(batch.astype(np.float32, copy=False))
    return images.to(device).permute(0, 3, 1, 2)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _parse_device(name: Optional[str]) -> torch.device:
    if not name:
        return _default_device()
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} was given but no CUDA device is available; use --device cpu.")
    return device


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """The Inception network's flags, shared by the evaluator and make_reference.py."""
    parser.add_argument(
        "--inception_weights",
        default=None,
        help=f"path to pt_inception-2015-12-05-6726825d.pth (default: ${WEIGHTS_ENV})",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="images per Inception forward pass")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)")


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compute Inception Score, FID, sFID, precision and recall of a sample "
        "batch against a reference batch (OpenAI ADM protocol)."
    )
    parser.add_argument("ref_batch", help="path to reference batch npz file")
    parser.add_argument("sample_batch", help="path to sample batch npz file")
    add_network_arguments(parser)
    parser.add_argument(
        "--cache_dir",
        default=os.environ.get(CACHE_ENV) or None,
        help=f"folder caching each batch file's activations, keyed by the file's sha256, so a file "
        f"is run through the network once (default: ${CACHE_ENV}; unset: no cache)",
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        help="precision/recall from float64 distances; differs from the original evaluator, "
        "whose float16 distances are the default (docs/evaluation.md)",
    )
    return parser


def main(argv=None) -> int:
    args = create_argparser().parse_args(argv)
    device = _parse_device(args.device)
    try:
        _evaluate(args, device)
    except (InceptionWeightsError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _evaluate(args, device) -> None:
    evaluator = Evaluator(
        batch_size=args.batch_size,
        device=device,
        weights_path=args.inception_weights,
        cache_dir=args.cache_dir,
        exact=args.exact,
    )
    print("loading the Inception network...")
    evaluator.warmup()

    print("computing reference batch activations...")
    ref_acts = evaluator.read_activations(args.ref_batch)
    print("computing/reading reference batch statistics...")
    ref_stats, ref_stats_spatial = evaluator.read_statistics(args.ref_batch, ref_acts)

    print("computing sample batch activations...")
    sample_acts = evaluator.read_activations(args.sample_batch)
    print("computing/reading sample batch statistics...")
    sample_stats, sample_stats_spatial = evaluator.read_statistics(args.sample_batch, sample_acts)

    print("Computing evaluations...")
    print("Inception Score:", evaluator.compute_inception_score(sample_acts[0]))
    print("FID:", float(sample_stats.frechet_distance(ref_stats)))
    print("sFID:", float(sample_stats_spatial.frechet_distance(ref_stats_spatial)))
    precision, recall = evaluator.compute_prec_recall(ref_acts[0], sample_acts[0])
    print("Precision:", precision)
    print("Recall:", recall)


if __name__ == "__main__":
    sys.exit(main())
