"""Bits per dimension of a diffusion model over a folder of images.

Evaluates the variational bound (Ho et al. 2020, Eq. 5; in bits per dimension
as Nichol & Dhariwal 2021) on the first ``--num_samples`` images of
``--data_dir`` (read in a fixed order), logs the running mean bpd, and writes
the per-timestep means of each term into the log directory: ``vb_terms.npz``,
``mse_terms.npz`` and ``xstart_mse_terms.npz`` (``arr_0`` of shape [T]).
``--nll_batch K`` evaluates K timesteps per model call: much faster, same
numbers up to float rounding. Example::

    python scripts/image_nll.py --preset cifar10_uncond_vlb_50M_500K \\
        --model_path models/cifar10_uncond_vlb_50M_500K.pt --data_dir cifar_test \\
        --num_samples 1000 --batch_size 16 --nll_batch 8
"""

import argparse
import math
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO, "guided_diffusion")):
    sys.path.insert(0, _REPO)  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from guided_diffusion import atomic, dist_util, errors, logger, perf, sample_util  # noqa: E402
from guided_diffusion.image_datasets import load_data  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_extra_defaults,
    parse_args_with_presets,
)

TERMS = ("vb", "mse", "xstart_mse")  # per-timestep terms of calc_bpd_loop saved as {term}_terms.npz


def create_argparser() -> argparse.ArgumentParser:
    """The original's flags, the model/diffusion flags, and our additions."""
    defaults = dict(data_dir="", clip_denoised=True, num_samples=1000, batch_size=1, model_path="")
    defaults.update(model_and_diffusion_defaults())
    defaults.update(model_extra_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dict_to_argparser(parser, defaults)
    parser.add_argument(
        "--nll_batch", type=int, default=1,
        help="timesteps evaluated per model call: a batch of N images runs as N*nll_batch rows "
        "(much faster at small --batch_size; same numbers within float tolerance; default 1, the original's way)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the noise draws (default: fresh, logged)")
    parser.add_argument(
        "--log_dir", type=str, default="",
        help="folder for the outputs (default: $OPENAI_LOGDIR, else a new temporary folder)",
    )
    parser.add_argument("--progress", action="store_true", help="show a progress bar over timesteps")
    perf.add_perf_flags(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Flags: script defaults < config beside the checkpoint(s) < --preset < the command line."""
    return parse_args_with_presets(create_argparser(), argv)


def main(argv=None):
    args = parse_args(argv)
    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None)
    sample_util.check_positive("num_samples", args.num_samples, 1000)
    sample_util.check_positive("batch_size", args.batch_size, 16)
    sample_util.check_positive("nll_batch", args.nll_batch, 8)
    sample_util.check_respacing(args.diffusion_steps, args.timestep_respacing)
    if not args.data_dir:
        raise sample_util.UsageError("--data_dir is empty: pass the folder of images to evaluate")
    if not os.path.isdir(args.data_dir):
        raise sample_util.UsageError(f"--data_dir {args.data_dir!r}: no such folder")

    logger.log("creating model and diffusion...")
    model_flags = sample_util.flags_dict(args, [*model_and_diffusion_defaults(), *model_extra_defaults()])
    model, diffusion = create_model_and_diffusion(**model_flags)
    sample_util.prepare_model(model, args.model_path, flag="model_path", flags=model_flags, use_fp16=args.use_fp16)

    logger.log("creating data loader...")
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        deterministic=True,
        random_flip=False,
        in_channels=args.in_channels,
    )
    logger.log("evaluating...")
    bpd = run_bpd_evaluation(perf.inference_model(model, args, dist_util.dev()), diffusion, data, args)
    logger.log(f"final bpd={bpd}")
    return bpd


def run_bpd_evaluation(model, diffusion, data, args) -> float:
    """Mean bpd over exactly ``args.num_samples`` images; writes the per-term npz files on rank 0.

    Image i of the (sharded, deterministic) data stream is evaluated by rank
    i % world; each round every rank evaluates at most one batch and the sums
    are reduced, so the logged running mean covers all ranks.
    """
    rank, world = sample_util.rank_and_world()
    seed = sample_util.resolve_seed(args.seed)
    logger.log(f"seed {seed}")
    share = sample_util.rank_share(args.num_samples, rank, world)
    rounds = math.ceil(math.ceil(args.num_samples / world) / args.batch_size)
    steps = diffusion.num_timesteps
    # One flat float64 vector per round: [count, sum of total_bpd, per-term sums over timesteps...].
    totals = np.zeros(2 + len(TERMS) * steps)
    loop_options = {}
    if args.nll_batch != 1:
        loop_options["timesteps_per_call"] = args.nll_batch
    if args.progress and rank == 0:
        loop_options["progress"] = True
    for round_index in range(rounds):
        local = np.zeros_like(totals)
        size = min(args.batch_size, share - round_index * args.batch_size)
        if size > 0:
            batch, cond = next(data)
            batch = batch[:size].to(dist_util.dev())
            model_kwargs = {key: value[:size].to(dist_util.dev()) for key, value in cond.items()}
            torch.manual_seed(sample_util.derived_seed(seed, rank, round_index))
            metrics = diffusion.calc_bpd_loop(
                model, batch, clip_denoised=args.clip_denoised, model_kwargs=model_kwargs, **loop_options
            )
            local[0] = size
            local[1] = metrics["total_bpd"].double().sum().item()
            for i, term in enumerate(TERMS):
                local[2 + i * steps : 2 + (i + 1) * steps] = metrics[term].double().sum(dim=0).cpu().numpy()
        totals += sample_util.all_reduce_sum(local)
        logger.log(f"done {int(totals[0])} samples: bpd={totals[1] / totals[0]}")
    if rank == 0:
        for i, term in enumerate(TERMS):
            means = totals[2 + i * steps : 2 + (i + 1) * steps] / totals[0]
            path = os.path.join(logger.get_dir(), f"{term}_terms.npz")
            atomic.atomic_savez(path, arr_0=means.astype(np.float32))
            logger.log(f"saved {term} terms to {os.path.abspath(path)}")
    return float(totals[1] / totals[0])


if __name__ == "__main__":
    errors.run_main(main)
