"""Export an ADM diffusion UNet to a diffusers folder, or import one (--reverse).

    python scripts/export_diffusers.py --model_path models/256x256_diffusion.pt --preset 256x256_diffusion \\
        --out exported/adm256
    python scripts/export_diffusers.py --reverse --model_path exported/adm256 --out pretrained/adm256

The export loads ``--model_path`` as ``guided_diffusion.pretrained.from_pretrained``
does (a pretrained folder, or a checkpoint with its config beside it or ``--preset``)
and writes ``unet/`` and ``scheduler/``, which diffusers' ``UNet2DModel.from_pretrained``
and ``DDPMScheduler.from_pretrained`` load without custom code (see
``guided_diffusion.diffusers_interop`` for what cannot be expressed and is refused).
``--reverse`` reads such a folder and writes a pretrained folder (``save_pretrained``).
Super-resolution models and classifiers cannot be exported, nor the consistency-models
checkpoints (Karras denoisers, which DDPMScheduler cannot drive).
"""

import argparse
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO, "guided_diffusion")):
    sys.path.insert(0, _REPO)  # run from a checkout without installing

from guided_diffusion import checkpoints, diffusers_interop, errors, presets, pretrained  # noqa: E402


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", required=True,
                        help="checkpoint file or pretrained folder (with --reverse: the diffusers folder)")
    parser.add_argument("--preset", default="", help="flags of a released checkpoint, when no config lies beside it")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--reverse", action="store_true",
                        help="import: read the diffusers folder --model_path and write a pretrained folder")
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        raise errors.UsageError(f"--out {args.out!r} is not empty; pass a new folder")
    if args.reverse:
        if not os.path.isfile(os.path.join(args.model_path, diffusers_interop.UNET_DIR, "config.json")):
            raise errors.UsageError(
                f"--model_path {args.model_path!r} is not a diffusers folder (no unet/config.json); "
                f"pass a folder written by export_diffusers.py"
            )
        flags, state_dict = diffusers_interop.import_folder(args.model_path)
        model, _ = pretrained.build(flags)
        checkpoints.load_model_weights(model, state_dict, flags=flags, source=args.model_path)
        pretrained.save_pretrained(model, flags, args.out)
    else:
        flags, name = pretrained.pretrained_flags(args.model_path, preset=args.preset)
        if presets.PRESETS.get(name, {}).get("source") == "consistency-models":
            raise errors.UsageError(
                f"{name} is a consistency-models checkpoint, a Karras denoiser (time input 250 ln sigma) that "
                f"DDPMScheduler cannot drive; sample it here (image_sample.py --preset {name} --model_path ...)"
            )
        model, _ = pretrained.from_pretrained(args.model_path, preset=args.preset)
        diffusers_interop.export(model, flags, args.out)
    print(os.path.abspath(args.out), flush=True)


if __name__ == "__main__":
    errors.run_main(main)
