"""Sample images from a diffusion model and save them as one numpy array.

Writes ``samples_{N}x{H}x{W}x{C}.npz`` (uint8 NHWC ``arr_0``; labels ``arr_1``
when the model is class-conditional) and a PNG grid beside it into the log
directory, then prints the npz's absolute path. Example (ImageNet 64x64)::

    python scripts/image_sample.py --preset 64x64_diffusion \\
        --model_path models/64x64_diffusion.pt --batch_size 4 --num_samples 100 \\
        --timestep_respacing 250 --seed 0

Runs as one process, under ``mpiexec -n N`` or ``torchrun --nproc_per_node N``.
"""

import argparse
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO, "guided_diffusion")):
    sys.path.insert(0, _REPO)  # run from a checkout without installing

from guided_diffusion import dist_util, errors, logger, perf, sample_util, sampling_cli  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_extra_defaults,
    parse_args_with_presets,
)


def create_argparser() -> argparse.ArgumentParser:
    """The original's flags, the model/diffusion flags, and the shared sampling flags."""
    defaults = dict(clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="")
    defaults.update(model_and_diffusion_defaults())
    defaults.update(model_extra_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dict_to_argparser(parser, defaults)
    sampling_cli.add_sampling_flags(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Flags: script defaults < config beside the checkpoint(s) < --preset < the command line."""
    return parse_args_with_presets(create_argparser(), argv, purpose="sample")


def main(argv=None):
    args = parse_args(argv)
    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None)
    if args.class_cond:
        sampling_cli.check_class_label(args.class_label, args.num_classes)
    sampling_cli.check_respacing(args.diffusion_steps, args.timestep_respacing)

    logger.log("creating model and diffusion...")
    model_flags = args_to_dict(args, [*model_and_diffusion_defaults(), *model_extra_defaults()])
    model, diffusion = create_model_and_diffusion(**model_flags)
    sampling_cli.prepare_model(model, args.model_path, flag="model_path", flags=model_flags, use_fp16=args.use_fp16)

    def conditioning(index, size, seed):
        if not args.class_cond:
            return {}, None
        labels = sample_util.draw_labels(
            sample_util.derived_seed(seed, index, 1), size, args.num_classes, args.class_label
        )
        return {"y": labels}, labels.numpy()

    path = sampling_cli.generate_and_save(
        args,
        diffusion=diffusion,
        model_fn=sampling_cli.guided_model(
            perf.inference_model(model, args, dist_util.dev()), args, diffusion, model_flags=model_flags,
            build=create_model_and_diffusion,
        ),
        image_shape=(args.in_channels, args.image_size, args.image_size),
        conditioning=conditioning,
        with_labels=args.class_cond,
    )
    return path


if __name__ == "__main__":
    errors.run_main(main)
