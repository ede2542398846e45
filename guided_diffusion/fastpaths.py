"""The fast paths: switches for the optimisations that are on by default.

A fast path is on by default because it gives the same float32 numbers as the
plain code (bit for bit, or within float rounding where the plain code is itself
only defined up to rounding, like the order of a sum). Each has a name, so that its
effect can be measured and, if ever needed, turned off::

    GUIDED_DIFFUSION_DISABLE=allocator,cpu_attention python scripts/image_sample.py ...
    python benchmarks/bench.py --disable allocator

or in code, ``fastpaths.disable("inplace")`` / ``with fastpaths.disabled("inplace"): ...``
(also reachable as ``perf.disable`` / ``perf.disabled``). The model code asks
`enabled`; this module imports nothing of the package but `errors`, so any module
may ask. See docs/performance.md.
"""

import contextlib
import ctypes
import ctypes.util
import os
import sys

from .errors import usage

ENV_VAR = "GUIDED_DIFFUSION_DISABLE"

# name -> what turning it off brings back.
FAST_PATHS = {
    "allocator": "glibc's default malloc thresholds on Linux (big CPU tensors mmap'ed and "
                 "unmapped on every allocation, paying page faults each time)",
    "cpu_attention": "scaled_dot_product_attention on CPU too (its 3-D CPU path is the slow "
                     "generic one); on GPU attention always uses SDPA's fused kernels",
    "sdpa": "the original's einsum attention everywhere (two scaled einsums and a softmax)",
    "token_attention": "attention blocks computed module by module on [N, C, T] tensors (1x1 "
                       "convolutions, heads as [N*heads, C/heads, T] batched matmuls) instead of on "
                       "token-major tensors with fused attention, when sampling and on GPUs",
    "recompute": "the normalisation / SiLU outputs of ResBlocks and the [T, T] attention weights "
                 "stored for the backward pass instead of recomputed there from their inputs "
                 "(more training memory)",
    "inplace": "out-of-place activations and residual adds (one extra tensor per op)",
    "cached_tables": "rebuilding the float64 coefficient tables on the device at every lookup",
    "foreach": "per-tensor EMA and gradient-norm loops",
    "release_grads": "gradients zeroed in place between training steps (a parameter-sized buffer "
                     "alive through the forward pass, and one more accumulation pass)",
    "aten_group_norm": "under --compile on CPU, Inductor's own generated GroupNorm kernels (2-3x "
                       "slower than ATen's, most in channels-last; the same Welford statistics)",
}

_disabled = set()


def _check_names(names):
    unknown = sorted(set(names) - set(FAST_PATHS))
    if unknown:
        raise usage(ValueError(
            f"unknown fast path(s) {', '.join(map(repr, unknown))}; the fast paths are "
            f"{', '.join(FAST_PATHS)} (set {ENV_VAR}=name,name or bench.py --disable name,name)."
        ))


def _names(text):
    return [n.strip() for n in str(text).split(",") if n.strip()]


def _read_env():
    names = _names(os.environ.get(ENV_VAR, ""))
    if "all" in names:
        names = list(FAST_PATHS)
    _check_names(names)
    _disabled.clear()
    _disabled.update(names)


def enabled(name):
    """Whether the fast path ``name`` (a key of `FAST_PATHS`) is on."""
    if name not in FAST_PATHS:
        _check_names([name])
    return name not in _disabled


def disable(*names):
    """Turn fast paths off for the rest of the process."""
    _check_names(names)
    _disabled.update(names)


def enable(*names):
    """Turn fast paths back on."""
    _check_names(names)
    _disabled.difference_update(names)


@contextlib.contextmanager
def disabled(*names):
    """Run a block with the given fast paths off (``names`` empty: all of them)."""
    names = names or tuple(FAST_PATHS)
    _check_names(names)
    before = set(_disabled)
    _disabled.update(names)
    try:
        yield
    finally:
        _disabled.clear()
        _disabled.update(before)


_read_env()


# ---------------------------------------------------------------------------- allocator

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 2**20    # the largest glibc accepts on 64-bit systems
_TRIM_THRESHOLD = 512 * 2**20   # free heap memory kept for reuse before returning it to the OS
_allocator_tuned = False


def tune_allocator():
    """Let glibc reuse freed CPU tensor memory instead of unmapping and re-faulting it.

    By default glibc serves allocations above a (dynamic) threshold with fresh
    ``mmap`` calls and hands them back on free, so every activation of a UNet forward
    pass pays one page fault per 4 KiB; the original spends a large share of its CPU
    sampling time there. Raising the mmap and trim thresholds keeps those pages in
    the heap. Numbers are unaffected. Runs once per process, on Linux with glibc
    only, and not at all when the ``allocator`` fast path is disabled. Returns
    whether the thresholds were changed.
    """
    global _allocator_tuned
    if _allocator_tuned or not enabled("allocator") or not sys.platform.startswith("linux"):
        return _allocator_tuned
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
    _allocator_tuned = ok
    return ok
