"""Command-line plumbing of the sampling scripts: flags, checks, models, sample-and-save.

The scripts ``image_sample.py``, ``classifier_sample.py``, ``super_res_sample.py``
and ``image_nll.py`` differ only in how they build a model and one batch; this
module holds the command-line side they share:

* flags beyond the original's (``--seed``, ``--log_dir``, ``--save_png``, ...)
  and the checks that turn a bad value into a message naming the flag;
* loading a checkpoint into a model ready for inference;
* picking the sampling loop the flags ask for, and :func:`generate_and_save`,
  which samples ``--num_samples`` images over all ranks (``sample_util``) and
  writes them on rank 0 (``outputs``).

Errors caused by what the user typed are raised as :class:`UsageError`; the
scripts print them as one ``error:`` line (see `errors.run_main`).
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import checkpoints, consistency, dist_util, guidance, logger, perf, presets, pretrained, solvers
from .errors import UsageError
from .outputs import save_samples, to_uint8_images
from .respace import space_timesteps
from .sample_util import derived_seed, resolve_seed, sample_in_batches
from .script_util import NUM_CLASSES, flags_json, str2bool


# --------------------------------------------------------------------------- flags


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """``--seed``, ``--log_dir`` and ``--progress``: the flags of every script that runs the model on images."""
    parser.add_argument(
        "--seed", type=int, default=None,
        help="base random seed; the same command with the same seed gives the same images "
        "(default: a fresh seed, written to the log)",
    )
    parser.add_argument(
        "--log_dir", type=str, default="",
        help="folder for the outputs (default: $OPENAI_LOGDIR, else a new temporary folder)",
    )
    parser.add_argument("--progress", action="store_true", help="show a progress bar over diffusion steps")


def add_sampling_flags(parser: argparse.ArgumentParser, *, class_choice: bool = True) -> None:
    """Add the flags every sampling script has beyond the original's ones."""
    add_run_flags(parser)
    parser.add_argument("--save_png", action="store_true", help="also write one PNG per image")
    parser.add_argument(
        "--use_plms", type=str2bool, nargs="?", const=True, default=False,
        help="sample with PLMS, pseudo linear multistep (Liu et al. 2022): few respaced steps "
        "(--timestep_respacing 50), no noise after the start; not with --use_ddim (default: False)",
    )
    add_solver_flags(parser)
    add_guidance_flags(parser)
    perf.add_perf_flags(parser)
    if class_choice:
        parser.add_argument(
            "--class_label", type=int, default=-1,
            help="draw every sample of this class (default -1: random labels in [0, num_classes))",
        )
    if class_choice and not _has_flag(parser, "num_classes"):
        parser.add_argument(
            "--num_classes", type=int, default=NUM_CLASSES,
            help="number of classes labels are drawn from",
        )


def add_solver_flags(parser: argparse.ArgumentParser) -> None:
    """``--sampler NAME --steps N [--spacing S]`` and the solvers' options (guided_diffusion.solvers)."""
    group = parser.add_argument_group("few-step solvers (instead of the original's DDPM / DDIM / PLMS loops)")
    group.add_argument(
        "--sampler", default="", choices=["", *solvers.SOLVERS, *consistency.CM_SAMPLERS],
        help="sample with this solver of guided_diffusion.solvers in --steps steps, or a consistency model "
        "with cm_onestep / cm_multistep (--cm_ts) (default: the original's loops, chosen by --use_ddim / --use_plms)",
    )
    group.add_argument(
        "--cm_ts", default="0,22,39",
        help="cm_multistep: the points of the Karras grid (of last + 1 noise levels) where the consistency "
        "model jumps to x_0 (default 0,22,39: two steps on 40 levels, as the consistency-models paper)",
    )
    group.add_argument(
        "--denoiser", default="", choices=["", *consistency.PRECONDITIONINGS],
        help="the network is a Karras denoiser: edm (the consistency-models EDM teachers: run them with a "
        "solver) or consistency (CD/CT models; the default of cm_onestep / cm_multistep). Default: the ADM chain",
    )
    group.add_argument("--steps", type=int, default=20, help="solver steps with --sampler (default: 20)")
    group.add_argument(
        "--spacing", default="", choices=["", *solvers.SPACINGS],
        help="where the solver's steps lie (default: the solver's own, solvers.DEFAULT_SPACING)",
    )
    for name, text in _SOLVER_OPTIONS.items():
        group.add_argument(f"--{name}", type=float, default=None, help=text)
    group.add_argument("--solver_order", type=int, default=None,
                       help="order of unipc (1-3, default 2) or ipndm (1-4, default 4)")


def add_guidance_flags(parser: argparse.ArgumentParser) -> None:
    """``--cfg_scale``, ``--cfg_interval`` and ``--guide_model_path`` (classifier-free guidance)."""
    group = parser.add_argument_group("classifier-free guidance (guided_diffusion.guidance.classifier_free)")
    group.add_argument(
        "--cfg_scale", type=float, default=0.0,
        help="eps = eps_c + scale * (eps_c - eps_u); 0 (default) is plain conditional sampling. The model "
        "must have been trained with --class_dropout_prob, or give --guide_model_path",
    )
    group.add_argument(
        "--cfg_interval", type=str, default="",
        help="LO,HI: guide only at timesteps LO <= t <= HI of the model's chain (default: everywhere)",
    )
    group.add_argument(
        "--guide_model_path", type=str, default="",
        help="the guide's checkpoint: an unconditional model (gets no labels) or a weaker checkpoint of the "
        "same model (autoguidance); default: the model itself with the null label",
    )
    group.add_argument(
        "--guide_preset", type=str, default="",
        help="the guide's flags when no config.json lies beside its checkpoint (default: the model's flags)",
    )


def parse_interval(text: str, *, flag: str = "cfg_interval", example: str = "100,700", cast=float) -> Optional[tuple]:
    """``"LO,HI"`` (the value of ``--flag``) -> (LO, HI) as ``cast`` makes them; empty -> None."""
    if not text:
        return None
    try:
        low, high = (cast(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--{flag} {text!r}: give two timesteps LO,HI, e.g. --{flag} {example}") from None
    if low > high:
        raise UsageError(f"--{flag} {text!r}: LO must not exceed HI, e.g. --{flag} {example}")
    return low, high


def guided_model(model_fn: Callable, args: argparse.Namespace, diffusion, *, model_flags: dict,
                 build: Callable) -> Callable:
    """``model_fn`` wrapped for ``--cfg_scale`` (itself when the scale is 0 and no guide is given).

    ``build(**flags)`` returns (model, diffusion) for the guide's flags: ``model_flags``
    updated by the config beside ``--guide_model_path`` or by ``--guide_preset``.
    """
    if not args.cfg_scale:
        return model_fn
    interval = parse_interval(args.cfg_interval)
    guide = None
    if args.guide_model_path:
        flags = dict(model_flags)
        saved = checkpoints.find_config(args.guide_model_path) or {}
        if args.guide_preset:
            saved = presets.preset_flags(args.guide_preset)
        flags.update({k: v for k, v in saved.items() if k in flags})
        network, _ = build(**flags)
        prepare_model(network, args.guide_model_path, flag="guide_model_path", flags=flags,
                      use_fp16=flags.get("use_fp16", False))
        guide = perf.inference_model(network, args, dist_util.dev())
    elif not model_flags.get("class_cond"):
        raise UsageError(
            "--cfg_scale with an unconditional model needs a guide: pass --guide_model_path (or drop --cfg_scale)"
        )
    scale = 1000.0 / diffusion.model_schedule.num_timesteps if diffusion.rescale_timesteps else 1.0
    return guidance.classifier_free(model_fn, args.cfg_scale, uncond_model=guide, interval=interval,
                                    timestep_scale=scale)


_SOLVER_OPTIONS = {
    "eta": "noise scale of ddim (default 0), euler_a and dpmpp_2m_sde (default 1)",
    "s_churn": "heun: EDM's stochastic churn S_churn (default 0: deterministic)",
    "s_tmin": "heun: churn only at noise levels sigma >= s_tmin (default 0)",
    "s_tmax": "heun: churn only at noise levels sigma <= s_tmax (default inf)",
    "s_noise": "heun, dpmpp_2m_sde: scale of the fresh noise (default 1)",
    "dynamic_threshold": "percentile p in (0, 1) for Imagen's dynamic thresholding of x_0 (e.g. 0.995), "
                         "for large guidance scales",
    "sigma_max": "start the solver's grid at this noise level (default: 80 with the solver's default spacing, "
                 "else the chain's top; see solvers.timesteps)",
    "sigma_min": "end a time_uniform, logsnr or karras grid at this noise level (default: 0.05 with the "
                 "solver's default logsnr spacing, else t = 0; see solvers.timesteps)",
}


def solver_options(args: argparse.Namespace) -> dict:
    """The solver options given on the command line (those left at None are the solver's defaults)."""
    options = {name: getattr(args, name) for name in _SOLVER_OPTIONS if getattr(args, name, None) is not None}
    if getattr(args, "solver_order", None) is not None:
        options["order"] = args.solver_order
    return options


def _has_flag(parser: argparse.ArgumentParser, dest: str) -> bool:
    """Whether ``parser`` already has a flag storing to ``dest``."""
    return any(action.dest == dest for action in parser._actions)


def check_positive(flag: str, value: int, example: int) -> None:
    """Raise :class:`UsageError` unless ``value`` is a positive integer."""
    if value is None or value <= 0:
        raise UsageError(f"--{flag} must be a positive number, got {value}; pass e.g. --{flag} {example}")


def check_class_label(class_label: int, num_classes: int) -> None:
    """``class_label`` is -1 (random labels) or a class id below ``num_classes``."""
    check_positive("num_classes", num_classes, 1000)
    if class_label < -1 or class_label >= num_classes:
        raise UsageError(
            f"--class_label {class_label} is not a class of this model: use 0..{num_classes - 1}, "
            f"or -1 for random labels (change --num_classes if the model has more classes)"
        )


def check_respacing(diffusion_steps: int, timestep_respacing: str) -> None:
    """Fail early, naming the flags, when ``--timestep_respacing`` cannot be met."""
    if not timestep_respacing:
        return
    try:
        space_timesteps(diffusion_steps, timestep_respacing)
    except (ValueError, AssertionError) as err:
        raise UsageError(
            f"--timestep_respacing {timestep_respacing!r} cannot be met with --diffusion_steps "
            f"{diffusion_steps} ({err}); use fewer steps, e.g. --timestep_respacing 250 or ddim25, "
            f"or leave it empty for all {diffusion_steps} steps"
        ) from None


# -------------------------------------------------------------------------- models


def load_weights(model: torch.nn.Module, path: str, *, flag: str, flags: Optional[dict] = None) -> None:
    """Load the checkpoint at ``path`` (given by ``--flag``) into ``model``, strictly.

    ``path`` is a checkpoint file or a pretrained folder (``pretrained.weights_file``);
    consistency-model attention weights are squeezed to our layout. Rank 0 reads the
    file and broadcasts it (``dist_util.load_state_dict``); a checkpoint that does not
    fit the model raises ``checkpoints.CheckpointError`` with the mismatched keys and
    the flags the checkpoint implies.
    """
    if not path:
        raise UsageError(f"--{flag} is empty: pass the checkpoint to load, e.g. --{flag} models/64x64_diffusion.pt")
    if "://" not in path and not os.path.exists(path):
        raise UsageError(f"--{flag} {path!r}: no such file or folder; check the path (download the checkpoint first)")
    state_dict = pretrained.read_weights(path, flag=flag)
    checkpoints.load_model_weights(model, state_dict, flags=flags, source=path)


def prepare_model(model: torch.nn.Module, path: str, *, flag: str, flags: dict, use_fp16: bool) -> torch.nn.Module:
    """Load weights, move to this rank's device, optionally cast to float16, set eval mode."""
    load_weights(model, path, flag=flag, flags=flags)
    model.to(dist_util.dev())
    if use_fp16:
        model.convert_to_fp16()
    return model.eval()


# ------------------------------------------------------------------------ sampling


def pick_sample_loop(diffusion, args: argparse.Namespace) -> Callable:
    """The sampling loop the flags ask for: DDPM, ``--use_ddim``, ``--use_plms`` or ``--sampler``."""
    use_plms = getattr(args, "use_plms", False)
    sampler = getattr(args, "sampler", "")
    if args.use_ddim and use_plms:
        raise UsageError("--use_ddim and --use_plms pick two different samplers; pass only one of them.")
    if getattr(args, "denoiser", "") and not sampler:
        raise UsageError(f"--denoiser {args.denoiser} needs a sampler: add e.g. --sampler heun --steps 40")
    if sampler in consistency.CM_SAMPLERS or getattr(args, "denoiser", ""):
        if args.use_ddim or use_plms:
            raise UsageError(f"--sampler {sampler} replaces the original's loops; drop --use_ddim / --use_plms.")
        if getattr(args, "cfg_scale", 0):
            raise UsageError(f"--cfg_scale works on the ADM chain, not with --sampler {sampler} on a Karras "
                             f"denoiser; drop --cfg_scale")
        return _karras_loop(args)
    if sampler:
        if args.use_ddim or use_plms:
            raise UsageError(
                f"--sampler {sampler} replaces the original's loops; drop --use_ddim / --use_plms "
                "(or drop --sampler to use them)."
            )
        check_positive("steps", args.steps, 20)
        return _solver_loop(diffusion, args)
    if use_plms:
        return diffusion.plms_sample_loop
    return diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop


def _solver_loop(diffusion, args: argparse.Namespace) -> Callable:
    """``solvers.sample`` for ``--sampler``, called like the original's loops."""
    options = solver_options(args)
    spacing = args.spacing or None
    solvers.grid(diffusion, args.sampler, args.steps, spacing, options.get("sigma_max"),
                 options.get("sigma_min"))  # check early

    def loop(model, shape, *, clip_denoised, model_kwargs, cond_fn, device, progress):
        return solvers.sample(
            diffusion, model, shape, args.sampler, args.steps, spacing=spacing, model_kwargs=model_kwargs,
            cond_fn=cond_fn, clip_denoised=clip_denoised, progress=progress, device=device, **options,
        )

    return loop


def _karras_loop(args: argparse.Namespace) -> Callable:
    """The loop for a network in the Karras-denoiser parameterisation (``guided_diffusion.consistency``):
    the consistency samplers, or a solver over the EDM / consistency preconditioning."""
    sampler = args.sampler
    preconditioning = args.denoiser or "consistency"
    ts = consistency.parse_ts(args.cm_ts) if sampler == "cm_multistep" else None
    options = solver_options(args)
    if sampler not in consistency.CM_SAMPLERS:
        check_positive("steps", args.steps, 40)
        if args.spacing not in ("", "karras"):
            raise UsageError(f"--denoiser {preconditioning} samples on the Karras grid; drop --spacing {args.spacing}")
        solvers.check_options(solvers.SOLVERS[sampler], options)

    def loop(model, shape, *, clip_denoised, model_kwargs, cond_fn, device, progress):
        if cond_fn is not None:
            raise UsageError("classifier guidance works on the ADM chain only; sample this model without a "
                             "classifier (image_sample.py)")
        denoiser = consistency.PreconditionedDenoiser(model, preconditioning, clip_denoised=clip_denoised,
                                                      model_kwargs=model_kwargs)
        noise = torch.randn(*shape, device=device)
        if sampler == "cm_onestep":
            return consistency.onestep(denoiser, noise)
        if sampler == "cm_multistep":
            return consistency.multistep(denoiser, noise, ts)
        return consistency.solve(denoiser, noise, sampler, args.steps, progress=progress, **options)

    return loop


def generate_and_save(
    args: argparse.Namespace,
    *,
    diffusion,
    model_fn: Callable,
    image_shape: tuple[int, int, int],
    conditioning: Callable[[int, int, int], tuple],
    with_labels: bool,
    cond_fn: Optional[Callable] = None,
) -> Optional[str]:
    """Sample ``args.num_samples`` images in batches on all ranks and save them on rank 0.

    ``image_shape`` is (C, H, W). ``conditioning(k, n, seed)`` returns
    ``(model_kwargs, labels)`` for global batch ``k`` of ``n`` images (labels:
    int64 numpy or None). The noise of batch ``k`` comes from
    ``derived_seed(seed, k)``, so the images depend only on ``--seed`` and
    ``--batch_size``, not on the number of processes. Returns the npz path on
    rank 0 (also printed, as the last line), None elsewhere.
    """
    check_positive("num_samples", args.num_samples, 16)
    check_positive("batch_size", args.batch_size, 16)
    rank, world = dist_util.rank_and_world()
    seed = resolve_seed(args.seed)
    logger.log(f"flags: {flags_json(args)}")
    logger.log(f"sampling {args.num_samples} images with seed {seed} on {world} process(es)")
    sample_loop = pick_sample_loop(diffusion, args)
    channels, height, width = image_shape

    def make_batch(index: int, size: int):
        model_kwargs, labels = conditioning(index, size, seed)
        model_kwargs = {key: value.to(dist_util.dev()) for key, value in model_kwargs.items()}
        torch.manual_seed(derived_seed(seed, index))
        sample = sample_loop(
            model_fn,
            (size, channels, height, width),
            clip_denoised=args.clip_denoised,
            model_kwargs=model_kwargs,
            cond_fn=cond_fn,
            device=dist_util.dev(),
            progress=args.progress and rank == 0,
        )
        return to_uint8_images(sample), labels

    images, labels = sample_in_batches(
        make_batch,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        image_shape=(height, width, channels),
        with_labels=with_labels,
        desc="sampling",
    )
    path = None
    if rank == 0:
        path = save_samples(images, labels, logger.get_dir(), save_png=args.save_png)
        logger.log(f"saved {len(images)} samples to {path}")
    if world > 1:
        dist.barrier()
    logger.log("sampling complete")
    if path is not None:
        print(path, flush=True)  # the last line of output: the npz's absolute path
    return path
