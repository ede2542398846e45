"""The figures of docs/editing.md: every operation of guided_diffusion.editing on real digits.

On held-out real digits (the digits demo's test split) and the digits demo model it reports:

- inversion: PSNR (dB, uint8) of invert-then-reconstruct, DDIM and exact (EDICT), at each
  ``--inversion_steps``;
- inpainting (keep the left half, RePaint): the largest change of a kept pixel (uint8 levels)
  and the share of results the digit classifier reads as the input's digit;
- SDEdit: RMS distance to the input and that share, at several strengths;
- ILVR: RMS distance of the result's low-pass to the reference's, guided and unguided;
- DPS (super-resolution x4, Gaussian deblurring, inpainting; measurement noise 0.05): the
  residual ||A x - y|| per image, of the first and last x_0 prediction and of the result,
  guided and unguided (zeta = 0), and the share read as the input's digit.

    python benchmarks/editing_figures.py                 # the digits demo model (trained on first use)
    python benchmarks/editing_figures.py --num_images 20 --steps 100   # quicker

Unguided baselines use the same seed and labels. Prints one table per operation and, for
each, a picture of the first ``--show`` digits as text (one row per digit: input | ... |
result, dark to light as `` .:-=+*#%@``); with ``--pictures DIR`` also writes each picture
as a PNG there, every digit scaled up 8x.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quality import demo_checkpoint, load, respaced  # noqa: E402

from guided_diffusion import digits_check, editing  # noqa: E402
from guided_diffusion.outputs import from_uint8_images, to_uint8_images  # noqa: E402


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / mse)


def rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


SHADES = " .:-=+*#%@"


def text_picture(columns):
    """Rows of uint8 NHW1 digits, the columns side by side, each pixel two characters."""
    lines = []
    for row in range(len(columns[0])):
        for y in range(columns[0].shape[1]):
            lines.append("  ".join("".join(SHADES[int(v) * len(SHADES) // 256] * 2 for v in column[row, y, :, 0])
                                   for column in columns))
        lines.append("")
    return "\n".join(lines)


def png_picture(columns, path, scale=8):
    """The same picture as a PNG: one row per digit, columns framed by a grey pixel."""
    tiles = [np.pad(c[..., 0], ((0, 0), (1, 1), (1, 1)), constant_values=128) for c in columns]
    grid = np.concatenate([np.concatenate(list(t), axis=0) for t in tiles], axis=1)
    Image.fromarray(np.kron(grid, np.ones((scale, scale), np.uint8))).save(path)


class Figures:
    def __init__(self, args):
        path = args.model_path or demo_checkpoint(args.cache)
        self.model, self.base, _ = load(path)
        self.model.requires_grad_(False)
        images, labels = digits_check.load_real_digits()
        _, test = digits_check.holdout_split(labels)
        rows = test[: args.num_images]
        self.pixels = images[rows][..., None]
        self.x = from_uint8_images(self.pixels)
        self.labels = torch.from_numpy(labels[rows])
        self.kwargs = {"y": self.labels}
        self.diffusion = respaced(self.base, args.steps)
        self.classifier = digits_check.train_digit_classifier(8)
        self.args = args

    def recognised(self, result):
        return float(np.mean(self.classifier.predict(to_uint8_images(result)) == self.labels.numpy()))

    def show(self, name, *columns):
        """Print the first ``--show`` digits of each column (tensors in [-1, 1]) as text, save the PNG."""
        columns = [to_uint8_images(c[: self.args.show].clamp(-1, 1)) for c in columns]
        print("\n```\n" + text_picture(columns) + "```")
        if self.args.pictures:
            Path(self.args.pictures).mkdir(parents=True, exist_ok=True)
            png_picture(columns, Path(self.args.pictures) / f"{name}.png")

    def timed(self, fn):
        torch.manual_seed(self.args.seed)
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    def inversion(self):
        print("| inversion | steps | PSNR (dB) | seconds |\n|---|---|---|---|")
        pairs = {"DDIM": (editing.invert, editing.reconstruct),
                 "EDICT": (editing.edict_invert, editing.edict_reconstruct)}
        shown = [self.x]
        for name, (invert, reconstruct) in pairs.items():
            for steps in self.args.inversion_steps:
                def round_trip():
                    x_T = invert(self.base, self.model, self.x, steps, model_kwargs=self.kwargs)
                    return reconstruct(self.base, self.model, x_T, steps, model_kwargs=self.kwargs)
                back, seconds = self.timed(round_trip)
                print(f"| {name} | {steps} | {psnr(to_uint8_images(back), self.pixels):.1f} | {seconds:.0f} |")
                shown.append(back)
        self.show("inversion", *shown)

    def inpainting(self):
        mask = torch.zeros(1, 1, 8, 8)
        mask[..., :4] = 1
        print("| jump length, jump_n_sample | kept pixels: max change | read as the input's digit | seconds |")
        print("|---|---|---|---|")
        for jump, count in ((1, 1), (5, 5), (10, 10)):
            out, seconds = self.timed(lambda: editing.inpaint(self.diffusion, self.model, self.x, mask, jump_length=jump,
                                                              jump_n_sample=count, model_kwargs=self.kwargs))
            kept = np.abs(to_uint8_images(out)[:, :, :4].astype(int) - self.pixels[:, :, :4].astype(int)).max()
            print(f"| {jump}, {count} | {kept} | {self.recognised(out):.2f} | {seconds:.0f} |")
        self.show("inpainting", self.x, mask * self.x + (1 - mask) * -1, out)

    def sdedit(self):
        print("| strength | RMS to the input | read as the input's digit |\n|---|---|---|")
        shown = [self.x]
        for strength in (0.25, 0.5, 0.75, 1.0):
            out, _ = self.timed(lambda: editing.sdedit(self.diffusion, self.model, self.x, strength,
                                                       model_kwargs=self.kwargs))
            print(f"| {strength} | {rms(out, self.x):.3f} | {self.recognised(out):.2f} |")
            shown.append(out)
        self.show("sdedit", *shown)

    def ilvr(self):
        print("| N | low-pass RMS, ILVR | low-pass RMS, unguided | read as the reference's digit |\n|---|---|---|---|")
        plain, _ = self.timed(lambda: self.diffusion.p_sample_loop(self.model, self.x.shape, model_kwargs=self.kwargs))
        shown = [self.x]
        for factor in (2, 4):
            out, _ = self.timed(lambda: editing.ilvr(self.diffusion, self.model, self.x, down_factor=factor,
                                                     model_kwargs=self.kwargs))
            target = editing.low_pass(self.x, factor)
            print(f"| {factor} | {rms(editing.low_pass(out, factor), target):.4f} | "
                  f"{rms(editing.low_pass(plain, factor), target):.3f} | {self.recognised(out):.2f} |")
            shown += [target, out]
        self.show("ilvr", *shown, plain)

    def dps(self):
        mask = torch.zeros(1, 1, 8, 8)
        mask[..., :4] = 1
        operators = {"sr4": editing.downsample_operator(4), "deblur": editing.blur_operator(5, 1.0),
                     "inpaint": editing.mask_operator(mask)}
        drawn = {"sr4": lambda y: torch.nn.functional.interpolate(y, scale_factor=4), "deblur": lambda y: y,
                 "inpaint": lambda y: y + (1 - mask) * -1}  # the measurement at the images' size
        print("| operator | zeta | residual of x0_hat: first -> last | residual of the result | read as the input's "
              "digit |\n|---|---|---|---|---|")
        for name, operator in operators.items():
            g = torch.Generator().manual_seed(self.args.seed)
            clean = operator(self.x)
            y = clean + 0.05 * torch.randn(clean.shape, generator=g)
            shown = [self.x, drawn[name](y)]
            for zeta in (0.0, *self.args.zetas):
                steps, _ = self.timed(lambda: list(editing.dps_progressive(
                    self.diffusion, self.model, operator, y, self.x.shape, zeta=zeta, model_kwargs=self.kwargs)))
                out = steps[-1]["sample"]
                final = (y - operator(out)).flatten(1).norm(dim=1).mean()
                first, last = steps[0]["residual"].mean(), steps[-1]["residual"].mean()
                print(f"| {name} | {zeta} | {first:.2f} -> {last:.2f} | {final:.2f} | {self.recognised(out):.2f} |")
                shown.append(out)
            self.show(f"dps_{name}", *shown)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", default="", help="a digits checkpoint with its config.json (default: the demo's)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "guided_diffusion" / "digits_demo"),
                   help="where the digits demo model is trained on first use")
    p.add_argument("--num_images", type=int, default=50, help="held-out real digits to edit")
    p.add_argument("--steps", type=int, default=250, help="respaced DDPM steps of inpainting, SDEdit, ILVR and DPS")
    p.add_argument("--inversion_steps", default="50,250", help="comma-separated DDIM step counts of the round trip")
    p.add_argument("--zetas", default="0.5,1,2", help="comma-separated DPS step sizes (0 = unguided is added)")
    p.add_argument("--only", default="", help="comma-separated subset of: inversion,inpainting,sdedit,ilvr,dps")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--show", type=int, default=3, help="digits drawn in each picture")
    p.add_argument("--pictures", default="", help="a folder to write each picture to as a PNG (default: none)")
    args = p.parse_args()
    args.inversion_steps = [int(s) for s in args.inversion_steps.split(",")]
    args.zetas = [float(z) for z in args.zetas.split(",")]
    figures = Figures(args)
    for name in (args.only.split(",") if args.only else ("inversion", "inpainting", "sdedit", "ilvr", "dps")):
        print(f"\n{name} ({args.num_images} held-out digits):\n")
        getattr(figures, name)()


if __name__ == "__main__":
    main()
