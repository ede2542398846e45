"""Speed switches: the default fast paths, and the opt-in performance flags of the scripts.

Two kinds of switch live here.

*Fast paths* are on by default because they give the same float32 numbers as the
plain code (bit for bit, or within float rounding where the plain code is itself
only defined up to rounding, like the order of a sum). Each has a name, so that its
effect can be measured and, if ever needed, turned off::

    GUIDED_DIFFUSION_DISABLE=allocator,cpu_attention python scripts/image_sample.py ...
    python benchmarks/bench.py --disable allocator

or in code, ``perf.disable("inplace")`` / ``with perf.disabled("inplace"): ...``.

*Performance flags* change the numbers (other kernels, other precisions), so they
are off unless asked for: ``--compile``, ``--channels_last``, ``--use_bf16``,
``--tf32``, ``--cudnn_benchmark`` and ``--fused_adam``. `add_perf_flags` puts them
on a script's parser (every training and sampling script calls it), and
`configure_backends`, `prepare_model`, `autocast` and `compile_model` apply them.
See docs/performance.md.
"""

import contextlib
import ctypes
import ctypes.util
import os
import sys

import torch

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


# ---------------------------------------------------------------------------- flags

PERF_FLAGS = {
    # name: (default, help)
    "compile": (False, "torch.compile the model (training and sampling; CPU and GPU). The first "
                       "steps are slow while it compiles"),
    "channels_last": (False, "keep the network's weights and activations in channels-last memory "
                             "format (faster convolutions on most hardware; float rounding differs)"),
    "use_bf16": (False, "run the network under bfloat16 autocast (weights and the diffusion maths "
                        "stay float32); the original float16 scheme stays available as --use_fp16"),
    "tf32": (False, "allow TF32 tensor-core matmuls and convolutions on NVIDIA GPUs (Ampere and "
                    "later); no effect on CPU"),
    "cudnn_benchmark": (False, "let cuDNN time its candidate algorithms for each new convolution shape "
                               "and keep the fastest (faster for the fixed shapes of training and "
                               "sampling after a slower first step; the algorithm picked, and with it "
                               "the float rounding, can vary from run to run); no effect on CPU"),
}
TRAIN_PERF_FLAGS = {
    "fused_adam": (False, "use the fused AdamW kernel, on CPU or GPU (faster; rounds differently "
                          "from the original's per-tensor AdamW)"),
}


def perf_defaults(training=False):
    """The performance flags and their defaults (all off), as a flag dict."""
    flags = {k: d for k, (d, _) in PERF_FLAGS.items()}
    if training:
        flags.update({k: d for k, (d, _) in TRAIN_PERF_FLAGS.items()})
    return flags


def _bool(text):
    from .script_util import str2bool

    return str2bool(text)


def add_perf_flags(parser, training=False):
    """Add ``--compile``, ``--channels_last``, ``--use_bf16``, ``--tf32``, ``--cudnn_benchmark``
    (and ``--fused_adam``).

    Each accepts a bare flag or an explicit value (``--compile``, ``--compile True``).
    """
    table = dict(PERF_FLAGS, **(TRAIN_PERF_FLAGS if training else {}))
    existing = {a.dest for a in parser._actions}
    for name, (default, text) in table.items():
        if name not in existing:
            parser.add_argument(f"--{name}", type=_bool, nargs="?", const=True, default=default,
                                help=f"{text} (default: {default})")


def _flag(args, name):
    return bool(getattr(args, name, False))


def check_flags(args, device):
    """Refuse flag combinations that cannot work, naming the flags."""
    for fp16 in ("use_fp16", "classifier_use_fp16"):
        if _flag(args, "use_bf16") and _flag(args, fp16):
            raise usage(ValueError(
                f"--use_bf16 and --{fp16} are two different mixed-precision schemes; pass only one "
                f"(--{fp16} True is the original's float16 torso, --use_bf16 is bfloat16 autocast)."
            ))
    if _flag(args, "use_bf16") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise usage(ValueError(
            f"--use_bf16 needs a GPU with bfloat16 support; {torch.cuda.get_device_name(device)} has "
            "none. Use --use_fp16 True instead."
        ))


def configure_backends(args, device=None):
    """Apply the process-wide switches (``--tf32``, ``--cudnn_benchmark``) and check the flags
    against ``device``.

    TF32 is set either way (torch allows it for cuDNN convolutions by default, which
    would change float32 numbers); cuDNN's autotuning is only ever switched on, so a
    caller that turned it on itself keeps it.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    check_flags(args, device)
    if _flag(args, "cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True
    if torch.cuda.is_available():
        tf32 = _flag(args, "tf32")
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def prepare_model(model, args):
    """Apply ``--channels_last`` to ``model`` in place and return it."""
    if _flag(args, "channels_last"):
        model.to(memory_format=torch.channels_last)
    return model


def autocast(args, device):
    """The autocast context of ``--use_bf16`` on ``device`` (a no-op context otherwise)."""
    device = torch.device(device)
    if _flag(args, "use_bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_model(model, args):
    """``torch.compile(model)`` (see `compile_module`) with ``--compile``, else ``model`` itself.

    The compiled wrapper shares the parameters of ``model``; keep using ``model``
    for ``state_dict``/``load_state_dict`` (the wrapper's keys carry a ``_orig_mod.`` prefix).
    Sampling gets the same plain compilation as training: Inductor's freezing (weights
    folded in as constants, convolution weights prepacked) measured no faster for DDIM
    on CPU (benchmarks/README.md).
    """
    if not _flag(args, "compile"):
        return model
    return compile_module(model)


def compile_module(module, device=None):
    """``torch.compile(module)`` with the backend for the device of its parameters (or ``device``).

    On CPU (fast path ``aten_group_norm``) Inductor compiles everything but GroupNorm,
    which stays ATen's kernel: Inductor's generated GroupNorm(-SiLU) kernels take 2-3x
    as long on CPU, most for channels-last tensors, ~25 ms more in a 230 ms sampling
    forward pass of the small config (benchmarks/README.md). Both compute the same
    Welford statistics; the small config's outputs and gradients agreed bit for bit.
    Should a torch release lack the Inductor internals this needs, it falls back to
    plain ``torch.compile``.
    """
    if device is None:
        first = next(module.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    if torch.device(device).type == "cpu" and enabled("aten_group_norm"):
        backend = _inductor_keeping_aten_group_norm()
        if backend is not None:
            return torch.compile(module, backend=backend)
    return torch.compile(module)


def _inductor_keeping_aten_group_norm():
    """The Inductor backend less its decomposition of GroupNorm, which then runs as ATen's
    kernel; None where this torch's Inductor does not offer the pieces."""

    def _contiguous_unless_4d(_fx_node, x, *args, **kwargs):
        # The kernel takes its input contiguous in its suggested memory format, as eager
        # group_norm hands it over; Inductor, left free, may pass an [N, C, T] strided
        # view (an attention block's reshape of channels-last activations). 4-D and 5-D
        # inputs keep Inductor's layout (contiguous or channels-last: both accepted,
        # and forcing the eager strides would add copies).
        if len(x.get_size()) < 4:
            x = ir.ExternKernel.require_contiguous(x)
        return (x, *args), kwargs

    try:
        import torch._functorch.config as functorch_config
        from torch._inductor import ir, lowering
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.decomposition import select_decomp_table

        aten = torch.ops.aten
        if aten.native_group_norm.default not in lowering.lowerings:
            # The lowering Inductor would create by itself for an op left undecomposed,
            # registered up front: with $CI set, Inductor refuses to create one for an
            # op that has a decomposition. Plain compiles decompose GroupNorm before
            # lowering, so they never reach it.
            lowering.make_fallback(aten.native_group_norm.default, layout_constraint=_contiguous_unless_4d,
                                   warn=False, override_decomp=True)
    except (ImportError, AttributeError, TypeError):
        return None
    kept = (aten.group_norm.default, aten.native_group_norm.default)

    def backend(graph, example_inputs):
        table = {op: fn for op, fn in select_decomp_table().items() if op not in kept}
        # AOTAutograd's cache key leaves the decomposition table out, so it could hand back
        # a graph compiled with Inductor's own GroupNorm; its cache is skipped (Inductor's
        # stays). Releases before that cache existed have no such setting.
        no_cache = (
            functorch_config.patch(enable_autograd_cache=False)
            if hasattr(functorch_config, "enable_autograd_cache")
            else contextlib.nullcontext()
        )
        with no_cache:
            return compile_fx(graph, example_inputs, decompositions=table)

    return backend


class AutocastModel:
    """Calls ``model`` under bfloat16 autocast; what the sampling loops get with ``--use_bf16``."""

    def __init__(self, model, device):
        self.model = model
        self.device = torch.device(device)

    def parameters(self):
        return self.model.parameters()

    def __call__(self, *args, **kwargs):
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
            return self.model(*args, **kwargs)


def inference_model(model, args, device):
    """The model callable a sampling script hands to the loops, with the performance flags applied.

    ``--channels_last`` converts ``model`` in place; ``--compile`` and ``--use_bf16``
    wrap it. ``model`` itself keeps its state_dict keys.
    """
    configure_backends(args, device)
    prepare_model(model, args)
    fn = compile_model(model, args)
    if _flag(args, "use_bf16"):
        fn = AutocastModel(fn, device)
    return fn
