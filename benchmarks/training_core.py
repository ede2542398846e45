"""Training speed of the logSNR training core on the digits demo: min-SNR-5 and v-prediction
against the eps baseline, at equal steps.

Each variant trains the digits demo's model and recipe (scripts/digits_demo.py: the same
flags, data, seed and steps) with only its own flags changed, keeping the EMA weights
every ``--eval_every`` steps. Every kept checkpoint samples the same start noise and
labels with DDIM (``--ddim_steps``, the original's striding) and is scored like
benchmarks/quality.py: the share of samples the demo's digit classifier recognises as
the requested digit, and the Frechet distance to the real digits on that classifier's
features. The table gives, per variant, the first evaluated step that reaches the
baseline's final recognised share and the first that reaches its final Frechet distance.

    python benchmarks/training_core.py --out_dir /tmp/core --json benchmarks/results/training_core_digits.json
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guided_diffusion import script_util  # noqa: E402
from guided_diffusion.sampling_cli import prepare_model  # noqa: E402
from quality import DigitScorer  # noqa: E402

VARIANTS = {
    "eps": {},
    "eps + min_snr 5": {"loss_weight": "min_snr", "min_snr_gamma": 5.0},
    "v": {"predict_v": True},
}


def _demo():
    spec = importlib.util.spec_from_file_location("digits_demo", ROOT / "scripts" / "digits_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_variant(demo, name, extra, args):
    """Train one variant (skipped when its final checkpoint exists); returns its log folder."""
    log_dir = Path(args.out_dir) / name.replace(" ", "_").replace("+", "")
    train_flags = dict(demo.TRAIN_FLAGS, max_steps=args.steps, save_interval=args.eval_every)
    final = log_dir / f"ema_{train_flags['ema_rate']}_{args.steps:06d}.pt"
    if not final.exists():
        command = demo.train_command(str(Path(args.out_dir) / "digits"), str(log_dir),
                                     {**demo.MODEL_FLAGS, **extra}, train_flags, args.seed)
        print(f"training {name} ...", flush=True)
        demo.train(command, str(log_dir), args.steps, train_flags["ema_rate"], env=demo.thread_env(args.threads))
    return log_dir


class Scorer:
    """One start noise and label set, sampled with DDIM and scored by quality.py's `DigitScorer`."""

    def __init__(self, args, size):
        g = torch.Generator().manual_seed(args.seed)
        self.labels = torch.arange(args.num_samples) % 10
        self.noise = torch.randn((args.num_samples, 1, size, size), generator=g)
        self.digits = DigitScorer(size)
        self.ddim_steps = args.ddim_steps

    @torch.no_grad()
    def score(self, checkpoint, flags):
        flags = dict(flags, timestep_respacing=f"ddim{self.ddim_steps}")
        model, diffusion = script_util.create_model_and_diffusion(**flags)
        prepare_model(model, str(checkpoint), flag="model_path", flags=flags, use_fp16=False)
        torch.manual_seed(0)
        samples = diffusion.ddim_sample_loop(model, self.noise.shape, noise=self.noise,
                                             model_kwargs={"y": self.labels})
        return self.digits(samples, self.labels)


def first_reaching(rows, key, target, better):
    for row in rows:
        if better(row[key], target):
            return row["step"]
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", required=True, help="data, runs and checkpoints of the three variants")
    p.add_argument("--steps", type=int, default=1500, help="training steps of every variant (the demo's)")
    p.add_argument("--eval_every", type=int, default=250, help="steps between scored checkpoints")
    p.add_argument("--num_samples", type=int, default=200)
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="", help="write the rows and the summary to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    demo = _demo()
    size = demo.MODEL_FLAGS["image_size"]
    demo._load_digits_export()(str(Path(args.out_dir) / "digits"), image_size=size)
    scorer = Scorer(args, size)
    base = {**script_util.model_and_diffusion_defaults(), **script_util.model_extra_defaults(), **demo.MODEL_FLAGS}
    results = {}
    for name, extra in VARIANTS.items():
        started = time.time()
        log_dir = train_variant(demo, name, extra, args)
        rows = []
        for step in range(args.eval_every, args.steps + 1, args.eval_every):
            checkpoint = log_dir / f"ema_{demo.TRAIN_FLAGS['ema_rate']}_{step:06d}.pt"
            recognised, frechet = scorer.score(checkpoint, {**base, **extra})
            rows.append({"step": step, "recognised": recognised, "frechet": frechet})
            print(f"{name:>16} step {step:>5}: recognised {recognised:.1%}  Frechet {frechet:.3f}", flush=True)
        results[name] = {"flags": extra, "rows": rows, "seconds": round(time.time() - started, 1)}
    final = results["eps"]["rows"][-1]
    print(f"\nbaseline (eps) at {final['step']} steps: recognised {final['recognised']:.1%}, "
          f"Frechet {final['frechet']:.3f}")
    for name, result in results.items():
        result["steps_to_baseline_recognised"] = first_reaching(
            result["rows"], "recognised", final["recognised"], lambda a, b: a >= b)
        result["steps_to_baseline_frechet"] = first_reaching(
            result["rows"], "frechet", final["frechet"], lambda a, b: a <= b)
        print(f"{name:>16}: steps to the baseline's recognised share {result['steps_to_baseline_recognised']}, "
              f"to its Frechet distance {result['steps_to_baseline_frechet']}")
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "variants": results}, f, indent=2)


if __name__ == "__main__":
    main()
