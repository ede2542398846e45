"""Train a diffusion model on a folder of images.

    python scripts/image_train.py --data_dir DIR --image_size 64 --num_channels 128 ...
    mpiexec -n 4 python scripts/image_train.py ...        (data parallel, MPI)
    torchrun --nproc_per_node 4 scripts/image_train.py ... (data parallel, torchrun)

See docs/training.md.
"""

import argparse
import os
import sys

try:
    import guided_diffusion  # noqa: F401
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, errors, logger, perf, pretrained
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_extra_defaults,
)
from guided_diffusion.train_util import (
    diffusion_training_defaults,
    parse_training_args,
    start_run,
    training_data,
    train_loop_from_args,
    training_extra_defaults,
)


def main(argv=None):
    args = parse_training_args(create_argparser(), argv)
    start_run(args)

    logger.log("creating model and diffusion...")
    keys = list(model_and_diffusion_defaults()) + list(model_extra_defaults())
    model, diffusion = create_model_and_diffusion(**args_to_dict(args, keys))
    if args.init_from and args.resume_checkpoint:
        logger.log(f"--init_from {args.init_from} not used: resuming from {args.resume_checkpoint}")
    elif args.init_from:
        pretrained.init_from(model, args.init_from, flags=args_to_dict(args, keys))
    model.to(dist_util.dev())
    perf.configure_backends(args, dist_util.dev())
    perf.prepare_model(model, args)
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    logger.log("creating data loader...")
    data = training_data(
        args, image_size=args.image_size, class_cond=args.class_cond, in_channels=args.in_channels
    )

    logger.log("training...")
    train_loop_from_args(
        args, model=model, diffusion=diffusion, data=data, schedule_sampler=schedule_sampler
    ).run_loop()


def create_argparser():
    defaults = diffusion_training_defaults()
    defaults.update(model_and_diffusion_defaults())
    defaults.update(model_extra_defaults())
    defaults.update(training_extra_defaults())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    add_dict_to_argparser(parser, dict(init_from=""))
    perf.add_perf_flags(parser, training=True)
    return parser


if __name__ == "__main__":
    errors.run_main(main)
