"""Edit images with a diffusion model: inpaint, sdedit, invert, reconstruct, ilvr, restore.

    python scripts/image_edit.py COMMAND --model_path MODEL.pt --input IMAGES [flags]

``--input`` is a folder of images (centre-cropped and resized to --image_size) or an
npz as image_sample.py writes it (uint8 NHWC ``arr_0``, labels ``arr_1``). The model's
flags come from the config.json beside its checkpoint, --preset or the command line.
Every command but ``invert`` writes ``samples_{N}x{H}x{W}x{C}.npz`` (results as uint8
NHWC ``arr_0``, labels ``arr_1`` for class-conditional models), its PNG grid, and
``..._compare.png``, one row per image: input | result (| mask or measurement); then it
prints the npz's path. ``invert`` writes ``latents_{N}x{H}x{W}x{C}.npz`` (float32 x_T,
NHWC), which ``reconstruct --input`` reads. The operations are those of
guided_diffusion.editing; docs/editing.md gives the papers' settings. Example::

    python scripts/image_edit.py inpaint --model_path run/ema_0.995_001500.pt \\
        --input digits/ --mask keep_left.png --timestep_respacing 250 --seed 0
"""

import argparse
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO, "guided_diffusion")):
    sys.path.insert(0, _REPO)  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from guided_diffusion import dist_util, editing, errors, logger, perf, sample_util, sampling_cli  # noqa: E402
from guided_diffusion.atomic import atomic_savez  # noqa: E402
from guided_diffusion.errors import UsageError  # noqa: E402
from guided_diffusion.image_datasets import list_image_files, read_image  # noqa: E402
from guided_diffusion.inputs import load_base_samples  # noqa: E402
from guided_diffusion.outputs import (  # noqa: E402
    from_uint8_images,
    image_grid,
    samples_file_name,
    save_samples,
    to_pil,
    to_uint8_images,
)
from guided_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_extra_defaults,
    parse_args_with_presets,
)

COMMANDS = {
    "inpaint": "fill the pixels outside --mask (RePaint, Lugmayr et al. 2022)",
    "sdedit": "noise the input to --strength and denoise it (SDEdit, Meng et al. 2022)",
    "invert": "DDIM inversion: the x_T that DDIM maps to each input (Song et al. 2021)",
    "reconstruct": "DDIM from the x_T of an invert run (its latents npz as --input)",
    "ilvr": "sample with the input's low frequencies (ILVR, Choi et al. 2021)",
    "restore": "solve an inverse problem: super-resolution x4, deblurring or inpainting (DPS, Chung et al. 2023)",
}
OPERATORS = ("sr4", "deblur", "inpaint")
GREY = 128  # the frame around each image's tile in the comparison grid


# --------------------------------------------------------------------------- flags


def create_argparser(command: str) -> argparse.ArgumentParser:
    """The model/diffusion flags, the flags every command shares, and the command's own."""
    defaults = dict(clip_denoised=True, batch_size=16, use_ddim=False, model_path="")
    defaults.update(model_and_diffusion_defaults())
    defaults.update(model_extra_defaults())
    parser = argparse.ArgumentParser(prog=f"image_edit.py {command}", description=COMMANDS[command])
    add_dict_to_argparser(parser, defaults)
    parser.add_argument("--input", default="", help="a folder of images or an npz (uint8 NHWC arr_0, labels arr_1)")
    sampling_cli.add_run_flags(parser)
    parser.add_argument("--class_label", type=int, default=-1,
                        help="label of every image for class-conditional models (default -1: the input npz's "
                             "arr_1, else random labels)")
    sampling_cli.add_guidance_flags(parser)
    perf.add_perf_flags(parser)
    if command in ("inpaint", "restore"):
        parser.add_argument("--mask", default="", help="a PNG (white = keep) of the images' size, or a folder of "
                                                       "them, one per input image" + (" (--operator inpaint)"
                                                                                      if command == "restore" else ""))
    if command == "inpaint":
        parser.add_argument("--jump_length", type=int, default=1, help="RePaint: steps to go back up per jump (10)")
        parser.add_argument("--jump_n_sample", type=int, default=1,
                            help="RePaint: times each stretch is denoised (10; 1: no resampling)")
    if command in ("sdedit", "invert", "reconstruct"):
        sampling_cli.add_solver_flags(parser)
    if command == "sdedit":
        parser.add_argument("--strength", type=float, default=0.5,
                            help="share of the chain to noise the input to, in [0, 1]: 0 keeps it, 1 ignores it")
    if command in ("invert", "reconstruct"):
        parser.set_defaults(steps=50, spacing="adm")
    if command == "ilvr":
        parser.add_argument("--down_factor", type=int, default=4, help="ILVR's N: low-pass by N x N block means")
        parser.add_argument("--t_range", default="", help="LO,HI: guide only at steps LO <= t <= HI of the "
                                                          "(respaced) chain (default: every step)")
    if command == "restore":
        parser.add_argument("--operator", default="sr4", choices=OPERATORS, help="the measurement A(x)")
        parser.add_argument("--zeta", type=float, default=1.0, help="DPS step size on grad ||y - A(x0)||")
        parser.add_argument("--measurement_noise", type=float, default=0.0,
                            help="standard deviation of the noise added to the simulated measurement y = A(x)")
        parser.add_argument("--blur_sigma", type=float, default=1.0, help="deblur: Gaussian width in pixels")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """``COMMAND`` then its flags: script defaults < config beside the checkpoint < --preset < the command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\ncommands:\n" + "\n".join(f"  {k:12} {v}" for k, v in COMMANDS.items()))
        raise SystemExit(0)
    if not argv or argv[0] not in COMMANDS:
        seen = repr(argv[0]) if argv else "nothing"
        raise UsageError(f"the first argument must be a command, one of {', '.join(COMMANDS)}; got {seen} "
                         "(see image_edit.py COMMAND --help)")
    args = parse_args_with_presets(create_argparser(argv[0]), argv[1:], purpose="sample")
    args.command = argv[0]
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse values that cannot work before loading anything."""
    sampling_cli.check_positive("batch_size", args.batch_size, 16)
    sampling_cli.check_respacing(args.diffusion_steps, args.timestep_respacing)
    if args.class_cond and args.class_label != -1:
        sampling_cli.check_class_label(args.class_label, args.num_classes)
    if args.command == "sdedit" and not 0 <= args.strength <= 1:
        raise UsageError(f"--strength {args.strength} lies outside [0, 1]: 0 keeps the input, 1 ignores it; "
                         "pass e.g. --strength 0.5")
    if args.command == "ilvr" and (args.down_factor < 1 or args.image_size % args.down_factor):
        raise UsageError(f"--down_factor {args.down_factor} must be a positive divisor of --image_size "
                         f"{args.image_size}, e.g. --down_factor 4")
    if args.command == "restore" and args.operator == "sr4" and args.image_size % 4:
        raise UsageError(f"--operator sr4 needs --image_size divisible by 4; got {args.image_size}")
    if _needs_mask(args) and not args.mask:
        raise UsageError("inpainting needs --mask: a PNG of the images' size, white where pixels are kept")
    if args.command == "ilvr":
        args.t_range = sampling_cli.parse_interval(args.t_range, flag="t_range", example="0,200", cast=int)


def _needs_mask(args):
    return args.command == "inpaint" or (args.command == "restore" and args.operator == "inpaint")


# --------------------------------------------------------------------------- inputs


def load_inputs(args: argparse.Namespace):
    """(images NCHW float in [-1, 1] or latents for reconstruct, their uint8 NHWC view, labels or None)."""
    if args.command == "reconstruct":
        latents, labels = _load_latents(args.input, args.image_size, args.in_channels)
        tensor = torch.from_numpy(latents).permute(0, 3, 1, 2).contiguous()
        return tensor, to_uint8_images(tensor), labels
    images, _ = load_base_samples(args.input, image_size=args.image_size, channels=args.in_channels,
                                  class_cond=False, flag="input", size_flag="image_size")
    labels = _npz_labels(args.input, len(images)) if args.class_cond else None
    return from_uint8_images(images), images, labels


def _npz_labels(path, count):
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as archive:
        labels = archive["arr_1"] if "arr_1" in archive.files else None
    return labels.astype(np.int64) if labels is not None and labels.shape == (count,) else None


def _load_latents(path, size, channels):
    if not os.path.isfile(path):
        raise UsageError(f"--input {path!r}: no such file; pass the latents npz an invert run wrote")
    with np.load(path, allow_pickle=False) as archive:
        latents = archive["arr_0"] if "arr_0" in archive.files else None
        labels = archive["arr_1"].astype(np.int64) if "arr_1" in archive.files else None
    if latents is None or latents.ndim != 4 or latents.shape[1:] != (size, size, channels) \
            or not np.issubdtype(latents.dtype, np.floating):
        found = "no arr_0" if latents is None else f"arr_0 {latents.dtype} {latents.shape}"
        raise UsageError(f"--input {path!r}: expected float latents N x {size} x {size} x {channels} as invert "
                         f"writes them; found {found}")
    return latents.astype(np.float32), labels


def load_masks(path: str, count: int, size: int) -> torch.Tensor:
    """Masks [1 or count, 1, size, size] of 0/1 from a PNG or a folder of them (white = keep)."""
    files = list_image_files(path) if os.path.isdir(path) else [path]
    if not os.path.exists(path) or not files:
        raise UsageError(f"--mask {path!r}: no such file, or a folder without images; pass a PNG, white = keep")
    if len(files) not in (1, count):
        raise UsageError(f"--mask {path!r} holds {len(files)} masks for {count} images; give one, or one per image")
    masks = []
    for file in files:
        pixels = np.asarray(read_image(file, 1))
        if pixels.shape != (size, size):
            raise UsageError(f"--mask {file!r} is {pixels.shape[1]}x{pixels.shape[0]} pixels but the images are "
                             f"{size}x{size}; give a mask of the images' size (white = keep)")
        masks.append(torch.from_numpy((pixels > 127).astype(np.float32)))
    return torch.stack(masks)[:, None]


def _labels(args, given, count, seed):
    if not args.class_cond:
        return None
    if args.class_label >= 0 or given is None:
        return sample_util.draw_labels(sample_util.derived_seed(seed, 0, 1), count, args.num_classes,
                                       args.class_label).numpy()
    if given.min() < 0 or given.max() >= args.num_classes:
        raise UsageError(f"--input {args.input!r}: labels arr_1 lie in [{given.min()}, {given.max()}], outside this "
                         f"model's classes 0..{args.num_classes - 1}; pass --class_label")
    return given


# --------------------------------------------------------------------------- the commands


def edit(args, diffusion, model, x, mask, model_kwargs):
    """(result, extra grid column or None) for one batch ``x`` of the command in ``args``."""
    common = dict(model_kwargs=model_kwargs, progress=args.progress)
    if args.command == "inpaint":
        out = editing.inpaint(diffusion, model, x, mask, jump_length=args.jump_length,
                              jump_n_sample=args.jump_n_sample, clip_denoised=args.clip_denoised, **common)
        return out, mask.expand_as(x) * 2 - 1
    if args.command == "sdedit":
        solver = dict(solver=args.sampler, steps=args.steps, spacing=args.spacing or None,
                      **sampling_cli.solver_options(args)) if args.sampler else {}
        return editing.sdedit(diffusion, model, x, args.strength, use_ddim=args.use_ddim,
                              clip_denoised=args.clip_denoised, **solver, **common), None
    if args.command == "invert":
        return editing.invert(diffusion, model, x, args.steps, spacing=args.spacing or "adm", **common), None
    if args.command == "reconstruct":
        return editing.reconstruct(diffusion, model, x, args.steps, solver=args.sampler or "ddim",
                                   spacing=args.spacing or "adm", **sampling_cli.solver_options(args), **common), None
    if args.command == "ilvr":
        return editing.ilvr(diffusion, model, x, down_factor=args.down_factor, t_range=args.t_range,
                            clip_denoised=args.clip_denoised, **common), None
    operator, show = _operator(args, mask)
    measurement = operator(x)
    measurement = measurement + args.measurement_noise * torch.randn_like(measurement)
    out = editing.dps(diffusion, model, operator, measurement, x.shape, zeta=args.zeta,
                      clip_denoised=args.clip_denoised, **common)
    return out, show(measurement)


def _operator(args, mask):
    """(A, a function drawing a measurement at the images' size)."""
    if args.operator == "sr4":
        return editing.downsample_operator(4), lambda y: F.interpolate(y, scale_factor=4, mode="nearest")
    if args.operator == "deblur":
        return editing.blur_operator(5, args.blur_sigma), lambda y: y
    return editing.mask_operator(mask), lambda y: y


# --------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None)
    seed = sample_util.resolve_seed(args.seed)
    inputs, shown, given_labels = load_inputs(args)
    labels = _labels(args, given_labels, len(inputs), seed)
    masks = load_masks(args.mask, len(inputs), args.image_size) if _needs_mask(args) else None

    logger.log(f"{args.command}: {len(inputs)} images with seed {seed}; creating model and diffusion...")
    model_flags = args_to_dict(args, [*model_and_diffusion_defaults(), *model_extra_defaults()])
    network, diffusion = create_model_and_diffusion(**model_flags)
    sampling_cli.prepare_model(network, args.model_path, flag="model_path", flags=model_flags,
                               use_fp16=args.use_fp16)
    network.requires_grad_(False)  # DPS differentiates with respect to the images only
    model = sampling_cli.guided_model(perf.inference_model(network, args, dist_util.dev()), args, diffusion,
                                      model_flags=model_flags, build=create_model_and_diffusion)

    results, extras = [], []
    for index, start in enumerate(range(0, len(inputs), args.batch_size)):
        rows = slice(start, start + args.batch_size)
        x = inputs[rows].to(dist_util.dev())
        mask = None if masks is None else (masks if len(masks) == 1 else masks[rows]).to(x.device)
        model_kwargs = {} if labels is None else {"y": torch.from_numpy(labels[rows]).to(x.device)}
        torch.manual_seed(sample_util.derived_seed(seed, index))
        out, extra = edit(args, diffusion, model, x, mask, model_kwargs)
        results.append(out.cpu())
        extras.append(None if extra is None else to_uint8_images(extra))
        logger.log(f"edited {min(start + args.batch_size, len(inputs))} of {len(inputs)} images")
    result = torch.cat(results)
    columns = [shown, to_uint8_images(result)]
    if extras[0] is not None:
        columns.append(np.concatenate(extras))
    path = _save(args, result, columns, labels)
    logger.log(f"saved {len(result)} results to {path}")
    print(path, flush=True)  # the last line of output: the npz's absolute path
    return path


def _save(args, result, columns, labels):
    out_dir = logger.get_dir()
    if args.command == "invert":
        latents = result.permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)
        path = os.path.abspath(os.path.join(out_dir, samples_file_name(latents, prefix="latents")))
        atomic_savez(path, **({"arr_0": latents} if labels is None else {"arr_0": latents, "arr_1": labels}))
    else:
        path = save_samples(columns[1], labels, out_dir)
    to_pil(_comparison_grid(columns)).save(path[: -len(".npz")] + "_compare.png")
    return path


def _comparison_grid(columns):
    """One tile per image, its columns side by side, tiles framed in grey and laid out by ``image_grid``."""
    tiles = np.concatenate(columns, axis=2)
    tiles = np.pad(tiles, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=GREY)
    return np.pad(image_grid(tiles), ((1, 1), (1, 1), (0, 0)), constant_values=GREY)


if __name__ == "__main__":
    errors.run_main(main)
