"""OpenAI's original guided_diffusion, fetched once from PyPI and run on this machine.

The package is guided-diffusion-sdk 1.0.0 (openai/guided-diffusion as published,
which reproduces every golden scenario of public.npz on the CPU that recorded it).
It is downloaded with pip into a cache folder ($GUIDED_DIFFUSION_CACHE, else
~/.cache/guided_diffusion) and is never imported by the caller: a subprocess gets it
on its PYTHONPATH.
"""

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "guided-diffusion-sdk==1.0.0"
FOLDER = "guided_diffusion_sdk-1.0.0"
SCENARIOS = Path(__file__).parent / "scenarios.py"

# The original uses np.int, which numpy 2 removed; the alias is the builtin it stood for.
NUMPY_SHIM = """\
import numpy

if not hasattr(numpy, "int"):
    numpy.int = int
"""


class Unavailable(RuntimeError):
    """The original could not be fetched (offline, or PyPI refused)."""


def cache_dir():
    """Where the original is kept: $GUIDED_DIFFUSION_CACHE, else ~/.cache/guided_diffusion."""
    return Path(os.environ.get("GUIDED_DIFFUSION_CACHE") or Path.home() / ".cache" / "guided_diffusion")


def fetch(cache=None):
    """The folder that holds the original `guided_diffusion` package, downloaded on first use.

    Raises `Unavailable`, with pip's last words, where it cannot be downloaded.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / FOLDER
    if (target / "guided_diffusion" / "gaussian_diffusion.py").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Unpacked beside the target and renamed into place, so that a concurrent caller
    # never sees half a package.
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                 "--retries", "0", "--timeout", "15", "-d", tmp, PACKAGE],
                capture_output=True, text=True, timeout=300,
            )
        except subprocess.TimeoutExpired as err:
            raise Unavailable(f"pip download {PACKAGE} took longer than {err.timeout} s") from err
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(f"pip download {PACKAGE} failed: {last[0]}")
        with tarfile.open(Path(tmp) / f"{FOLDER}.tar.gz") as tar:
            tar.extractall(tmp, filter="data")
        try:
            os.replace(Path(tmp) / FOLDER, target)
        except OSError:  # another process put it there first
            if not (target / "guided_diffusion").exists():
                raise
    return target


def replay(package_dir, out, scenario_set="public"):
    """Start `scenarios.py --set scenario_set` under the original in ``package_dir``, writing ``out``.

    Returns the running `subprocess.Popen`, so that the caller can run its own replay
    meanwhile; its output goes to ``out`` with the suffix ``.log``.
    """
    out = Path(out)
    shim = out.parent / "original_numpy_shim"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "sitecustomize.py").write_text(NUMPY_SHIM)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package_dir), str(shim)]))
    env.pop("OPENAI_LOGDIR", None)
    with open(out.with_suffix(".log"), "w") as log:
        return subprocess.Popen(
            [sys.executable, str(SCENARIOS), "--set", scenario_set, "-q", "--out", str(out)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )

