"""
The first run: train a small class-conditional diffusion model on real
handwritten digits on the CPU, sample every class, and score the samples.

    python scripts/digits_demo.py                  # a few minutes on 2 CPU cores
    python scripts/digits_demo.py --quick          # seconds-long smoke run

Steps (docs/demo.md shows how to run each one by hand):

1. ``datasets/digits.py`` writes scikit-learn's 1,797 bundled digits (no
   download) as class-prefixed PNGs;
2. ``scripts/image_train.py`` trains a small class-conditional UNet on them;
3. the EMA weights sample ten images of every digit (DDPM, 100 steps); the
   samples are saved as ``samples_NxHxWxC.npz`` (the format image_sample.py
   writes) and as a PNG grid with one row per digit, whose path is printed;
4. ``guided_diffusion.digits_check`` reports the share of samples a classifier
   trained on the real digits recognises as the requested digit.

The exit status is 0 when that share reaches 80% (always 0 with ``--quick``,
which trains too briefly to be judged), 1 when it does not.
"""

import argparse
import csv
import glob
import importlib.util
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import guided_diffusion  # noqa: F401
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from guided_diffusion import atomic, digits_check, sample_util  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_extra_defaults,
)

# The model and diffusion: 8x8 grayscale digits, ten classes, a two-level UNet
# without attention (at 8x8 pixels convolutions see the whole digit), cosine
# noise schedule, epsilon prediction with fixed variances (the simple loss
# converges fastest in a short run).
MODEL_FLAGS = dict(
    image_size=8,
    in_channels=1,
    num_classes=10,
    class_cond=True,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="",
    use_scale_shift_norm=True,
    dropout=0.0,
    learn_sigma=False,
    diffusion_steps=1000,
    noise_schedule="cosine",
)
# Training: a large learning rate and a short EMA suit a run of a few thousand steps.
TRAIN_FLAGS = dict(
    batch_size=64,
    lr=2e-3,
    ema_rate="0.995",
    max_steps=1500,
    log_interval=100,
    save_interval=1_000_000,  # only the final checkpoint set
    random_flip=False,  # a mirrored 3 is not a 3
    num_workers=0,
)
SAMPLE_RESPACING = "100"  # ancestral (DDPM) sampling on 100 of the 1000 steps
PER_CLASS = 10

# --quick: the same pipeline, shrunk to a few seconds.
QUICK_MODEL = dict(MODEL_FLAGS, diffusion_steps=100)
QUICK_TRAIN = dict(TRAIN_FLAGS, batch_size=16, max_steps=3, log_interval=1)
QUICK_RESPACING = "5"
QUICK_PER_CLASS = 2

GRID_SCALE = 4  # each 8x8 sample is drawn as 32x32 pixels in the PNG grid


def _load_digits_export():
    """``export_digits`` from datasets/digits.py (the datasets folder is not a package)."""
    path = os.path.join(REPO, "datasets", "digits.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing; run the demo from a complete checkout of the repository."
        )
    spec = importlib.util.spec_from_file_location("_digits_export", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.export_digits


def flags_to_argv(flags):
    """``{"lr": 0.002, "class_cond": True}`` -> ``["--lr", "0.002", "--class_cond", "True"]``."""
    argv = []
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


def thread_env(threads):
    """Environment for the training process, limited to ``threads`` CPU threads."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def train_command(data_dir, log_dir, model_flags, train_flags, seed):
    """The image_train.py command line the demo runs (also shown in docs/demo.md)."""
    script = os.path.join(REPO, "scripts", "image_train.py")
    flags = dict(data_dir=data_dir, log_dir=log_dir, seed=seed, **model_flags, **train_flags)
    return [sys.executable, script] + flags_to_argv(flags)


def _last_progress(log_dir):
    """(step, loss) from the last row of progress.csv, or None before the first row."""
    path = os.path.join(log_dir, "progress.csv")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return None
    if not rows:
        return None
    row = rows[-1]
    try:
        return int(float(row.get("step") or 0)), float(row.get("loss") or "nan")
    except ValueError:
        return None


def train(command, log_dir, max_steps, ema_rate, poll_seconds=5.0, env=None):
    """Run the training command, print one progress line per poll; returns the EMA checkpoint."""
    os.makedirs(log_dir, exist_ok=True)
    output_path = os.path.join(log_dir, "train_output.txt")
    start = time.time()
    with open(output_path, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        shown = None
        while process.poll() is None:
            time.sleep(poll_seconds)
            progress = _last_progress(log_dir)
            if progress and progress != shown:
                shown = progress
                print(
                    f"  step {progress[0]:>5}/{max_steps}  loss {progress[1]:.4f}  "
                    f"({time.time() - start:.0f} s)",
                    flush=True,
                )
    if process.returncode != 0:
        with open(output_path) as f:
            tail = "".join(f.readlines()[-20:])
        raise RuntimeError(
            f"training failed with exit status {process.returncode}; the end of its output "
            f"({output_path}):\n{tail}"
        )
    # The final set is named after the step count; older files in log_dir may be from earlier runs.
    checkpoint = os.path.join(log_dir, f"ema_{ema_rate}_{max_steps:06d}.pt")
    if not os.path.isfile(checkpoint):
        found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(log_dir, "ema_*.pt")))
        raise RuntimeError(
            f"training finished but wrote no {os.path.basename(checkpoint)} in {log_dir} "
            f"(found {found}); see {output_path}."
        )
    return checkpoint


@torch.no_grad()
def sample_every_class(checkpoint, model_flags, respacing, per_class, seed):
    """``per_class`` samples of each digit (DDPM on the respaced steps): uint8 NHWC images, labels."""
    flags = {**model_and_diffusion_defaults(), **model_extra_defaults(), **model_flags}
    flags["timestep_respacing"] = respacing
    model, diffusion = create_model_and_diffusion(**flags)
    sample_util.prepare_model(model, checkpoint, flag="model_path", flags=flags, use_fp16=False)
    labels = torch.arange(model_flags["num_classes"]).repeat_interleave(per_class)
    torch.manual_seed(seed)
    size = model_flags["image_size"]
    samples = diffusion.p_sample_loop(
        model, (len(labels), model_flags["in_channels"], size, size), model_kwargs={"y": labels}
    )
    return sample_util.to_uint8_images(samples), labels.numpy()


def save_class_grid(images, per_class, path, scale=GRID_SCALE, gap=1):
    """Write a PNG with one row per class, each image enlarged ``scale`` times (nearest).

    Images are separated by ``gap`` pixels (before enlarging) of dark gray, since
    the digits touch their top and bottom edges.
    """
    n, h, w, c = images.shape
    classes = n // per_class
    grid = np.full((classes * (h + gap) - gap, per_class * (w + gap) - gap, c), 40, dtype=np.uint8)
    for i, image in enumerate(images):
        row, col = divmod(i, per_class)
        grid[row * (h + gap):row * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = image
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    image = image.resize((image.width * scale, image.height * scale), resample=Image.NEAREST)
    image.save(path)
    return os.path.abspath(path)


def run(out_dir, quick=False, seed=0, max_steps=None, threads=1):
    """The whole demo; returns the :class:`digits_check.DigitsCheckResult`."""
    model_flags = QUICK_MODEL if quick else MODEL_FLAGS
    train_flags = dict(QUICK_TRAIN if quick else TRAIN_FLAGS)
    if max_steps is not None:
        train_flags["max_steps"] = max_steps
    respacing = QUICK_RESPACING if quick else SAMPLE_RESPACING
    per_class = QUICK_PER_CLASS if quick else PER_CLASS
    data_dir = os.path.join(out_dir, "digits")
    log_dir = os.path.join(out_dir, "train")
    start = time.time()
    torch.set_num_threads(threads)

    size = model_flags["image_size"]
    print(f"[1/4] writing the 1,797 digits as {size}x{size} PNGs to {os.path.abspath(data_dir)}", flush=True)
    _load_digits_export()(data_dir, image_size=size)

    print(f"[2/4] training for {train_flags['max_steps']} steps (log: {os.path.abspath(log_dir)})", flush=True)
    checkpoint = train(
        train_command(data_dir, log_dir, model_flags, train_flags, seed), log_dir,
        train_flags["max_steps"], train_flags["ema_rate"], poll_seconds=1.0 if quick else 10.0,
        env=thread_env(threads),
    )
    print(f"  training done, {time.time() - start:.0f} s since the start", flush=True)

    print(f"[3/4] sampling {per_class} of each digit with {respacing} DDPM steps", flush=True)
    images, labels = sample_every_class(checkpoint, model_flags, respacing, per_class, seed)
    sample_dir = os.path.join(out_dir, "samples")
    os.makedirs(sample_dir, exist_ok=True)
    npz_path = os.path.join(sample_dir, sample_util.samples_file_name(images))
    atomic.atomic_savez(npz_path, arr_0=images, arr_1=labels)
    grid_path = save_class_grid(images, per_class, os.path.join(sample_dir, "digits_grid.png"))

    print("[4/4] checking the samples with a classifier trained on the real digits", flush=True)
    result = digits_check.check_samples(images, labels)
    print(result.format_table())
    print(f"samples: {os.path.abspath(npz_path)}")
    print(f"total time: {time.time() - start:.0f} s")
    print(f"grid of samples (one row per digit 0..9): {grid_path}", flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--out_dir", default="digits_demo", help="folder for data, checkpoints and samples (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run of every step (not scored)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and sampling (default %(default)s)")
    parser.add_argument("--max_steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads for training and sampling (default %(default)s: the model is so small that "
        "more threads gain little, and they slow down badly when other programs share the cores)",
    )
    args = parser.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max_steps must be at least 1, got {args.max_steps}.")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}.")
    result = run(args.out_dir, quick=args.quick, seed=args.seed, max_steps=args.max_steps, threads=args.threads)
    return 0 if args.quick else result.exit_code


if __name__ == "__main__":
    sys.exit(main())
