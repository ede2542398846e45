"""Train a super-resolution diffusion model on a folder of images.

The low-resolution input of every example is its training image downsampled on
the fly (area interpolation) to ``--small_size``; the model learns to generate the
``--large_size`` image from it. Runs like image_train.py (mpiexec, torchrun);
see docs/training.md.
"""

import argparse
import os
import sys

try:
    import guided_diffusion  # noqa: F401
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.nn.functional as F

from guided_diffusion import dist_util, errors, logger, perf
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    sr_create_model_and_diffusion,
    sr_extra_defaults,
    sr_model_and_diffusion_defaults,
)
from guided_diffusion.train_util import (
    diffusion_training_defaults,
    parse_training_args,
    start_run,
    training_data,
    train_loop_from_args,
    training_extra_defaults,
)


def with_low_res(data, small_size):
    """Add ``cond["low_res"]``: each batch downsampled to ``small_size`` with area interpolation."""
    for large_batch, cond in data:
        cond = dict(cond)
        cond["low_res"] = F.interpolate(large_batch, size=(small_size, small_size), mode="area")
        yield large_batch, cond


def main(argv=None):
    args = parse_training_args(create_argparser(), argv)
    if args.small_size > args.large_size:
        raise errors.UsageError(
            f"--small_size ({args.small_size}) must not exceed --large_size ({args.large_size}); "
            "the low-resolution input is the training image downsampled to --small_size."
        )
    start_run(args, purpose="super-resolution training")

    logger.log("creating model...")
    keys = list(sr_model_and_diffusion_defaults()) + list(sr_extra_defaults())
    model, diffusion = sr_create_model_and_diffusion(**args_to_dict(args, keys))
    model.to(dist_util.dev())
    perf.configure_backends(args, dist_util.dev())
    perf.prepare_model(model, args)
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    logger.log("creating data loader...")
    data = with_low_res(
        training_data(args, image_size=args.large_size, class_cond=args.class_cond, in_channels=args.in_channels),
        args.small_size,
    )

    logger.log("training...")
    train_loop_from_args(
        args, model=model, diffusion=diffusion, data=data, schedule_sampler=schedule_sampler
    ).run_loop()


def create_argparser():
    defaults = diffusion_training_defaults()
    defaults.update(sr_model_and_diffusion_defaults())
    defaults.update(sr_extra_defaults())
    defaults.update(training_extra_defaults())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    perf.add_perf_flags(parser, training=True)
    return parser


if __name__ == "__main__":
    errors.run_main(main)
