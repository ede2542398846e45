"""A cache of Inception activations, keyed by the content of the batch file.

Scoring a 50,000-image batch spends nearly all its time in the Inception network,
and the same reference batch is scored against every sample batch. The cache
stores a file's ``(pool, spatial)`` activations under

    <cache_dir>/<sha256 of the .npz file>-<fingerprint of the network>.npz

so renaming or copying a file still hits the cache, rewriting it misses, and
features of other weights (or of an older feature layout, see ``FEATURES_VERSION``)
are never mixed in. The batch size and the device are not part of the key: they
change features only in the last float32 digits.

The folder comes from ``--cache_dir`` or ``$GUIDED_DIFFUSION_ACTIVATIONS_CACHE``;
without either nothing is cached.
"""

import hashlib
import os
from typing import Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from guided_diffusion.atomic import atomic_savez

__all__ = ["CACHE_ENV", "FEATURES_VERSION", "sha256_file", "network_fingerprint", "ActivationsCache"]

CACHE_ENV = "GUIDED_DIFFUSION_ACTIVATIONS_CACHE"
# Part of every key: bump it when the features of a given network change meaning
# (2: sFID features flattened (h, w, c) as the original does).
FEATURES_VERSION = 2
_CHUNK = 1 << 24


def sha256_file(path: str, progress: bool = False) -> str:
    """Hex sha256 of the file's bytes, read in 16 MiB chunks (with a progress bar in bytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(
        total=os.path.getsize(path), unit="B", unit_scale=True, desc="hashing", disable=not progress, leave=False
    ) as bar:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def network_fingerprint(network: torch.nn.Module) -> str:
    """Hex sha256 over the network's parameter and buffer names and values (and ``FEATURES_VERSION``)."""
    digest = hashlib.sha256(f"features-v{FEATURES_VERSION}".encode())
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class ActivationsCache:
    """Activations of batch files, stored as ``.npz`` files in one folder.

    :param folder: the cache folder (created when the first entry is written).
    :param network: the feature network; its fingerprint is part of every key.
    :param progress: show a progress bar while hashing large files.
    """

    def __init__(self, folder: str, network: torch.nn.Module, progress: bool = False):
        self.folder = os.path.expanduser(folder)
        self.fingerprint = network_fingerprint(network)
        self.progress = progress

    def path_for(self, npz_path: str) -> str:
        """Where the activations of ``npz_path`` (its current content) are cached."""
        return os.path.join(self.folder, f"{sha256_file(npz_path, self.progress)}-{self.fingerprint[:16]}.npz")

    def load(self, entry: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """``(pool, spatial)`` stored at ``entry``, or None when there is none."""
        if not os.path.exists(entry):
            return None
        with np.load(entry) as data:
            return data["pool"], data["spatial"]

    def save(self, entry: str, activations: Tuple[np.ndarray, np.ndarray]) -> None:
        """Store ``(pool, spatial)`` at ``entry`` (atomically: readers never see half a file)."""
        os.makedirs(self.folder, exist_ok=True)
        pool, spatial = activations
        atomic_savez(entry, pool=pool, spatial=spatial)
