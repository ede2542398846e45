"""The opt-in performance flags of the scripts, and the fast-path switches re-exported.

*Performance flags* change the numbers (other kernels, other precisions), so they
are off unless asked for: ``--compile``, ``--channels_last``, ``--use_bf16``,
``--tf32``, ``--cudnn_benchmark`` and ``--fused_adam``. `add_perf_flags` puts them
on a script's parser (every training and sampling script calls it), and
`configure_backends`, `prepare_model`, `autocast` and `compile_model` apply them.

The *fast paths*, on by default because they keep the numbers, are switched in
`fastpaths`; its names (``enabled``, ``disable``, ``enable``, ``disabled``,
``FAST_PATHS``, ``ENV_VAR``, ``tune_allocator``) are importable from here too.
See docs/performance.md.
"""

import contextlib

import torch

from .errors import usage
from .fastpaths import (  # noqa: F401 (re-exported: perf.disable etc. are the documented names)
    ENV_VAR,
    FAST_PATHS,
    disable,
    disabled,
    enable,
    enabled,
    tune_allocator,
)
from .flags import parser_flags, str2bool

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


def add_perf_flags(parser, training=False):
    """Add ``--compile``, ``--channels_last``, ``--use_bf16``, ``--tf32``, ``--cudnn_benchmark``
    (and ``--fused_adam``).

    Each accepts a bare flag or an explicit value (``--compile``, ``--compile True``).
    """
    table = dict(PERF_FLAGS, **(TRAIN_PERF_FLAGS if training else {}))
    existing = parser_flags(parser)
    for name, (default, text) in table.items():
        if name not in existing:
            parser.add_argument(f"--{name}", type=str2bool, nargs="?", const=True, default=default,
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
