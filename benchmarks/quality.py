"""Sample quality against the number of model calls, for every solver of guided_diffusion.solvers.

For each solver at each budget of model calls (default 5, 10, 20, 50) it samples the
same start noise and labels and reports:

- ``rmse``: root mean square distance, in [-1, 1] pixel units, of the final samples to
  a many-step DDIM reference (``--reference_steps``, default 1000) from the same noise;
- ``recognised``: for the digits demo model, the share of samples the demo's digit
  classifier (an RBF SVM on the real digits) recognises as the requested digit;
- ``frechet``: for the digits demo model, the Frechet distance between generated and
  real digits on that classifier's features (its 10 one-vs-rest decision values);
- ``calls`` (model calls made) and ``seconds`` (wall time).

Baselines in the same table: the original's DDPM with ``--ddpm_steps`` (250) respaced
steps, and, when k-diffusion can be imported (tests/peers.py fetches it without its
dependencies), its ``sample_dpmpp_2m`` driven by ``solvers.to_karras_denoiser`` over
its default Karras sigmas for this model and over the hand-tuned sigma_max = 80.

    python benchmarks/quality.py                            # the digits demo model (trained on first use)
    python benchmarks/quality.py --solvers dpmpp_2m,unipc --calls 10,20 --num_samples 200
    python benchmarks/quality.py --model_path run/ema_0.9999_500000.pt --num_samples 64 \\
        --batch_size 16 --calls 10,20 --reference_steps 250      # any checkpoint: RMSE only

On a released ImageNet checkpoint the digit metrics do not apply; there, sample 50,000
images per setting with ``scripts/image_sample.py --sampler NAME --steps N`` on a GPU
and score them with ``evaluations/evaluator.py`` against the reference batch
(docs/evaluation.md). Prints a table and writes JSON (``--json``).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from evaluations.metrics import compute_statistics  # noqa: E402
from guided_diffusion import checkpoints, digits_check, guidance, script_util, solvers  # noqa: E402
from guided_diffusion.outputs import to_uint8_images  # noqa: E402
from guided_diffusion.respace import SpacedDiffusion, space_timesteps  # noqa: E402
from guided_diffusion.sampling_cli import prepare_model, solver_options  # noqa: E402

DEMO_STEPS = 1500
DEMO_EMA = "0.995"


def demo_checkpoint(cache):
    """The digits demo's EMA checkpoint, trained once (about 5 minutes on 2 cores) into ``cache``."""
    path = Path(cache) / "train" / f"ema_{DEMO_EMA}_{DEMO_STEPS:06d}.pt"
    if not path.exists():
        print(f"training the digits demo model into {cache} (once) ...", file=sys.stderr)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "digits_demo.py"), "--out_dir", str(cache)],
                       check=True)
    return path


def load(model_path):
    flags = {**script_util.model_and_diffusion_defaults(), **script_util.model_extra_defaults()}
    flags.update(checkpoints.find_config(str(model_path)) or {})
    flags = {k: flags[k] for k in [*script_util.model_and_diffusion_defaults(), *script_util.model_extra_defaults()]}
    flags["timestep_respacing"] = ""
    model, diffusion = script_util.create_model_and_diffusion(**flags)
    prepare_model(model, str(model_path), flag="model_path", flags=flags, use_fp16=False)
    return model, diffusion, flags


class DigitScorer:
    """The demo's digit classifier and the real digits' statistics on its features."""

    def __init__(self, size):
        self.classifier = digits_check.train_digit_classifier(size)
        real, _ = digits_check.exported_digit_features(size)
        self.real_stats = compute_statistics(self.classifier.model.decision_function(real))

    def __call__(self, samples, labels):
        """(share recognised as ``labels``, Frechet distance to the real digits) of NCHW samples in [-1, 1]."""
        images = to_uint8_images(samples)
        share = digits_check.check_samples(images, labels.numpy(), classifier=self.classifier).share
        features = self.classifier.model.decision_function(digits_check.images_to_digit_features(images))
        return share, compute_statistics(features).frechet_distance(self.real_stats)


class Bench:
    """One model, one start noise and one label set; runs samplers and scores their samples."""

    def __init__(self, model, diffusion, flags, args):
        self.model, self.diffusion, self.args = model, diffusion, args
        g = torch.Generator().manual_seed(args.seed)
        size = flags["image_size"]
        self.shape = (args.num_samples, flags["in_channels"], size, size)
        self.noise = torch.randn(self.shape, generator=g)
        self.labels = None
        if flags["class_cond"]:
            self.labels = torch.arange(args.num_samples) % flags["num_classes"]
        self.scorer = DigitScorer(size) if args.digits else None
        self.reference = None

    def batches(self, fn):
        """Run ``fn(noise, model_kwargs, generator)`` over batches; returns the samples and the calls made."""
        outs, calls = [], 0
        g = torch.Generator().manual_seed(self.args.seed + 1)
        for start in range(0, self.shape[0], self.args.batch_size):
            rows = slice(start, start + self.args.batch_size)
            kwargs = {} if self.labels is None else {"y": self.labels[rows]}
            sample, used = fn(self.noise[rows], kwargs, g)
            outs.append(sample.float())
            calls = used
        return torch.cat(outs), calls

    def score(self, name, fn):
        start = time.perf_counter()
        with torch.no_grad():
            samples, calls = self.batches(fn)
        row = {"sampler": name, "calls": calls, "seconds": round(time.perf_counter() - start, 2)}
        if self.reference is not None:
            row["rmse"] = float(torch.sqrt(torch.mean((samples - self.reference) ** 2)))
        if self.scorer is not None and self.labels is not None:
            row["recognised"], row["frechet"] = self.scorer(samples, self.labels)
        print(_format(row), flush=True)
        return row, samples


def reference(bench, args, model_path):
    """Score the DDIM reference and keep its samples in ``bench.reference``; cached beside the
    demo model (keyed by checkpoint, steps, samples and seed), as it is the slowest run."""
    key = f"{Path(model_path).stem}_{os.path.getmtime(model_path):.0f}_{args.reference_steps}_{args.num_samples}_{args.seed}"
    cached = Path(args.cache) / f"reference_{key}.pt"
    steps = args.reference_steps
    respacing = f"ddim{steps}" if steps < bench.diffusion.num_timesteps else str(steps)
    if cached.exists():
        samples = torch.load(cached, weights_only=True)
        chunks = iter(samples.split(args.batch_size))
        row, _ = bench.score(f"reference: DDIM-{steps} (cached)", lambda noise, kwargs, g: (next(chunks), steps))
    else:
        row, samples = bench.score(f"reference: DDIM-{steps}", original_fn(bench, "ddim_sample_loop", respacing))
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(samples, cached)
    bench.reference = samples
    return row


def solver_fn(bench, name, steps, spacing, **options):
    def fn(noise, kwargs, generator):
        result = solvers.run(bench.diffusion, bench.model, noise.shape, name, steps, spacing=spacing, noise=noise,
                             model_kwargs=kwargs, clip_denoised=True, generator=generator, **options)
        return result.sample, result.model_calls
    return fn


def original_fn(bench, loop, respacing):
    spaced = respaced(bench.diffusion, respacing)

    def fn(noise, kwargs, generator):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        sample = getattr(spaced, loop)(bench.model, noise.shape, noise=noise, clip_denoised=True, model_kwargs=kwargs)
        return sample, spaced.num_timesteps
    return fn


def kdiffusion_fn(bench, calls, sigma_max=None):
    import peers

    sampling = peers.kdiffusion_sampling()
    if sampling is None:
        return None
    denoiser = solvers.to_karras_denoiser(bench.diffusion, bench.model, clip_denoised=True)
    sigmas = sampling.get_sigmas_karras(calls, denoiser.sigma_min, sigma_max or denoiser.sigma_max, rho=7.0)
    sigmas = sigmas.to(torch.float64)

    def fn(noise, kwargs, generator):
        start = noise.double() * torch.sqrt(1 + sigmas[0] ** 2)
        before = denoiser.calls
        sample = sampling.sample_dpmpp_2m(denoiser, start, sigmas, extra_args=kwargs, disable=True)
        return sample, denoiser.calls - before
    return fn


def respaced(diffusion, respacing):
    """``diffusion`` (a full chain) respaced by ``respacing`` (e.g. "250" or "ddim25")."""
    return SpacedDiffusion(space_timesteps(diffusion.num_timesteps, str(respacing)), betas=diffusion.betas,
                           model_mean_type=diffusion.model_mean_type, model_var_type=diffusion.model_var_type,
                           loss_type=diffusion.loss_type, rescale_timesteps=diffusion.rescale_timesteps,
                           loss_weight=diffusion.loss_weight)


def guidance_rows(bench, args, budgets):
    """The solvers under classifier-free guidance at each of ``--cfg_scales``, with and without the interval."""
    rows, plain = [], bench.model
    intervals = [None] + ([tuple(float(v) for v in args.cfg_interval.split(","))] if args.cfg_interval else [])
    for calls in budgets:
        for scale in (float(v) for v in args.cfg_scales.split(",")):
            for interval in intervals:
                bench.model = guidance.classifier_free(plain, scale, interval=interval)
                for name in args.solvers.split(","):
                    where = f", t in [{interval[0]:g}, {interval[1]:g}]" if interval else ""
                    row = bench.score(f"{name} cfg {scale:g}{where}", solver_fn(bench, name, steps_for(name, calls), None))[0]
                    row.update(solver=name, budget=calls, cfg_scale=scale, cfg_interval=interval)
                    rows.append(row)
    bench.model = plain
    return rows


def steps_for(name, calls):
    """Solver steps that spend at most ``calls`` model calls (Heun: two per step, one on the last)."""
    return max(1, (calls + 1) // 2) if solvers.CALLS_PER_STEP[name] == 2 else calls


def _format(row):
    parts = [f"{row['sampler']:34s}", f"calls {row['calls']:4d}"]
    for key, fmt in (("rmse", "rmse {:.4f}"), ("recognised", "recognised {:6.1%}"), ("frechet", "FD {:.3f}")):
        if key in row:
            parts.append(fmt.format(row[key]))
    parts.append(f"{row['seconds']:7.1f} s")
    return "  ".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="", help="checkpoint with its config.json (default: the digits demo model)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "guided_diffusion" / "digits_demo"),
                   help="where the digits demo model is trained on first use")
    p.add_argument("--solvers", default=",".join(solvers.SOLVERS), help="comma-separated solver names")
    p.add_argument("--calls", default="5,10,20,50", help="comma-separated budgets of model calls")
    p.add_argument("--spacing", default="",
                   help="comma-separated spacings to run every solver with (default: each solver's own)")
    p.add_argument("--sigma_max", type=float, default=None, help="the solvers' sigma_max (solvers.timesteps)")
    p.add_argument("--sigma_min", type=float, default=None, help="the solvers' sigma_min (solvers.timesteps)")
    p.add_argument("--solver_order", type=int, default=None, help="order of unipc / ipndm")
    p.add_argument("--cfg_scales", default="",
                   help="comma-separated classifier-free guidance scales: run the solvers at each, with and "
                        "without --cfg_interval (for a model trained with --class_dropout_prob)")
    p.add_argument("--cfg_interval", default="", help="LO,HI guidance interval for the --cfg_scales rows")
    p.add_argument("--digits", action="store_true",
                   help="score with the digits demo's classifier (implied without --model_path)")
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=500)
    p.add_argument("--reference_steps", type=int, default=1000, help="DDIM steps of the reference samples")
    p.add_argument("--ddpm_steps", type=int, default=250, help="respaced steps of the DDPM baseline (0: none)")
    p.add_argument("--no_kdiffusion", action="store_true", help="skip k-diffusion's sample_dpmpp_2m baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model_path = Path(args.model_path) if args.model_path else demo_checkpoint(args.cache)
    model, diffusion, flags = load(model_path)
    args.digits = args.digits or not args.model_path
    bench = Bench(model, diffusion, flags, args)
    rows = []
    rows.append(reference(bench, args, model_path))
    if args.ddpm_steps:
        rows.append(bench.score(f"original DDPM-{args.ddpm_steps}",
                                original_fn(bench, "p_sample_loop", str(args.ddpm_steps)))[0])
    budgets = [int(c) for c in args.calls.split(",")]
    if args.cfg_scales:
        rows += guidance_rows(bench, args, budgets)
        budgets = []
    for calls in budgets:
        if not args.no_kdiffusion:
            for label, sigma_max in (("default sigmas", None), ("sigma_max 80", 80.0)):
                fn = kdiffusion_fn(bench, calls, sigma_max)
                if fn is not None:
                    rows.append(bench.score(f"k-diffusion dpmpp_2m, {label}", fn)[0])
        for name in args.solvers.split(","):
            # None: the solver's defaults (its spacing and sigma range), as a new user gets them
            for spacing in args.spacing.split(",") if args.spacing else [None]:
                options = solver_options(args)
                if name not in ("unipc", "ipndm"):
                    options.pop("order", None)
                fn = solver_fn(bench, name, steps_for(name, calls), spacing, **options)
                label = spacing or f"default: {solvers.DEFAULT_SPACING[name]}"
                row = bench.score(f"{name} ({label})", fn)[0]
                row.update(solver=name, spacing=label, budget=calls)
                rows.append(row)
    meta = {"model_path": str(model_path), "num_samples": args.num_samples, "seed": args.seed,
            "reference_steps": args.reference_steps, "threads": args.threads, "torch": torch.__version__,
            "commit": _commit()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


def _commit():
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    main()
