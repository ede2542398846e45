"""Sample class-conditional images with classifier guidance (Dhariwal & Nichol 2021).

Every sample gets a label (random in [0, num_classes), or ``--class_label``);
the reverse process is steered by ``classifier_scale * grad log p(y | x_t)`` from
a noise-aware classifier (DDPM, or DDIM with ``--use_ddim True``). With
``--classifier_scale 0`` the samples equal those of ``image_sample.py`` with the
same seed. Writes ``samples_{N}x{H}x{W}x{C}.npz`` (``arr_0`` images, ``arr_1``
labels) and a PNG grid into the log directory. Example (ImageNet 128x128)::

    python scripts/classifier_sample.py --preset 128x128_diffusion,128x128_classifier \\
        --model_path models/128x128_diffusion.pt --classifier_path models/128x128_classifier.pt \\
        --classifier_scale 0.5 --batch_size 4 --num_samples 100 --timestep_respacing 250
"""

import argparse
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO, "guided_diffusion")):
    sys.path.insert(0, _REPO)  # run from a checkout without installing

from guided_diffusion import dist_util, errors, guidance, logger, perf, sample_util, sampling_cli  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    args_to_dict,
    classifier_defaults,
    classifier_extra_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_extra_defaults,
    parse_args_with_presets,
)


def create_argparser() -> argparse.ArgumentParser:
    """The original's flags, model/diffusion and classifier flags, and the shared sampling flags."""
    defaults = dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        model_path="",
        classifier_path="",
        classifier_scale=1.0,
    )
    defaults.update(model_and_diffusion_defaults())
    defaults.update(classifier_defaults())
    defaults.update(model_extra_defaults())
    defaults.update(classifier_extra_defaults())  # shares in_channels and num_classes
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dict_to_argparser(parser, defaults)
    sampling_cli.add_sampling_flags(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Flags: script defaults < config beside the checkpoint(s) < --preset < the command line."""
    return parse_args_with_presets(
        create_argparser(), argv, checkpoint_flags=("model_path", "classifier_path"), purpose="sample"
    )


def main(argv=None):
    args = parse_args(argv)
    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None)
    sampling_cli.check_class_label(args.class_label, args.num_classes)
    sampling_cli.check_respacing(args.diffusion_steps, args.timestep_respacing)

    logger.log("creating model and diffusion...")
    model_flags = args_to_dict(args, [*model_and_diffusion_defaults(), *model_extra_defaults()])
    model, diffusion = create_model_and_diffusion(**model_flags)
    sampling_cli.prepare_model(model, args.model_path, flag="model_path", flags=model_flags, use_fp16=args.use_fp16)

    logger.log("loading classifier...")
    classifier_flags = args_to_dict(args, [*classifier_defaults(), *classifier_extra_defaults()])
    classifier = create_classifier(**classifier_flags)
    sampling_cli.prepare_model(
        classifier,
        args.classifier_path,
        flag="classifier_path",
        flags=classifier_flags,
        use_fp16=args.classifier_use_fp16,
    )
    cond_fn = guidance.classifier_cond_fn(classifier, args.classifier_scale)

    network = sampling_cli.guided_model(
        perf.inference_model(model, args, dist_util.dev()), args, diffusion, model_flags=model_flags,
        build=create_model_and_diffusion,
    )

    def model_fn(x, t, y=None):
        # The labels reach the diffusion model only when it was trained with them.
        return network(x, t, y if args.class_cond else None)

    def conditioning(index, size, seed):
        labels = sample_util.draw_labels(
            sample_util.derived_seed(seed, index, 1), size, args.num_classes, args.class_label
        )
        return {"y": labels}, labels.numpy()

    path = sampling_cli.generate_and_save(
        args,
        diffusion=diffusion,
        model_fn=model_fn,
        image_shape=(args.in_channels, args.image_size, args.image_size),
        conditioning=conditioning,
        with_labels=True,
        cond_fn=cond_fn,
    )
    return path


if __name__ == "__main__":
    errors.run_main(main)
