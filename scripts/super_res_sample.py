"""Upsample low-resolution images with a super-resolution diffusion model.

``--base_samples`` is an npz as written by ``image_sample.py`` (uint8 NHWC
``arr_0`` at ``--small_size``; labels ``arr_1`` for class-conditional models)
or a folder of images (centre-cropped and resized to ``--small_size``). Output
image ``i`` upsamples base image ``i % len(base)``. Writes
``samples_{N}x{H}x{W}x{C}.npz`` (``arr_1`` = the labels used, when
class-conditional) and a PNG grid into the log directory. Example (64 -> 256)::

    python scripts/super_res_sample.py --preset 64_256_upsampler \\
        --model_path models/64_256_upsampler.pt --base_samples samples_100x64x64x3.npz \\
        --batch_size 4 --num_samples 100 --timestep_respacing 250
"""

import argparse
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO, "guided_diffusion")):
    sys.path.insert(0, _REPO)  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from guided_diffusion import dist_util, errors, logger, perf, sampling_cli  # noqa: E402
from guided_diffusion.inputs import load_base_samples  # noqa: E402
from guided_diffusion.outputs import from_uint8_images  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    args_to_dict,
    parse_args_with_presets,
    sr_create_model_and_diffusion,
    sr_extra_defaults,
    sr_model_and_diffusion_defaults,
)


def create_argparser() -> argparse.ArgumentParser:
    """The original's flags, the super-resolution model/diffusion flags, and the shared sampling flags."""
    defaults = dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        base_samples="",
        model_path="",
    )
    defaults.update(sr_model_and_diffusion_defaults())
    defaults.update(sr_extra_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dict_to_argparser(parser, defaults)
    sampling_cli.add_sampling_flags(parser, class_choice=False)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Flags: script defaults < config beside the checkpoint(s) < --preset < the command line."""
    return parse_args_with_presets(create_argparser(), argv, purpose="sample")


def main(argv=None):
    args = parse_args(argv)
    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None)
    sampling_cli.check_respacing(args.diffusion_steps, args.timestep_respacing)
    channels = args.in_channels
    base_images, base_labels = load_base_samples(
        args.base_samples, image_size=args.small_size, channels=channels, class_cond=args.class_cond
    )
    logger.log(f"loaded {len(base_images)} base samples from {args.base_samples}")

    logger.log("creating model and diffusion...")
    model_flags = args_to_dict(args, [*sr_model_and_diffusion_defaults(), *sr_extra_defaults()])
    model, diffusion = sr_create_model_and_diffusion(**model_flags)
    sampling_cli.prepare_model(model, args.model_path, flag="model_path", flags=model_flags, use_fp16=args.use_fp16)

    def conditioning(index, size, seed):
        first = index * args.batch_size
        rows = np.arange(first, first + size) % len(base_images)
        model_kwargs = {"low_res": from_uint8_images(base_images[rows])}
        labels = None
        if args.class_cond:
            labels = base_labels[rows]
            model_kwargs["y"] = torch.from_numpy(labels)
        return model_kwargs, labels

    path = sampling_cli.generate_and_save(
        args,
        diffusion=diffusion,
        model_fn=sampling_cli.guided_model(
            perf.inference_model(model, args, dist_util.dev()), args, diffusion, model_flags=model_flags,
            build=sr_create_model_and_diffusion,
        ),
        image_shape=(channels, args.large_size, args.large_size),
        conditioning=conditioning,
        with_labels=args.class_cond,
    )
    return path


if __name__ == "__main__":
    errors.run_main(main)
