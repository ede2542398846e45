#!/usr/bin/env python3
"""Speed and memory benchmarks for guided_diffusion, against the original code.

Every measurement runs in a fresh worker process (so peak memory is that of one
task alone), and the implementations are interleaved round by round (ours,
original, ours, original, ...) so that machine load affects both alike.  The
figure reported per (implementation, task) is the median over rounds.

    python benchmarks/bench.py                                 # small config, CPU, fp32
    python benchmarks/bench.py --tasks train,ddim --rounds 5
    python benchmarks/bench.py --impls ours --compile --channels_last
    python benchmarks/bench.py --config paper64 --precision bf16 --device cuda
    python benchmarks/bench.py --config paper64 --device cuda --tasks train \
        --precision bf16 --compile --flags_for ours --original_precision fp16    # issue 8's GPU target
    python benchmarks/bench.py --impls ours --disable allocator,cpu_attention   # one fast path's effect
    python benchmarks/bench.py --json results.json
    python benchmarks/bench.py --impls ours,baseline,original --baseline_dir /tmp/before   # a change's effect

Implementations: `ours` is the package in this checkout; `original` is OpenAI's
guided_diffusion as published on PyPI (guided-diffusion-sdk 1.0.0, which
reproduces every golden scenario of tests/golden exactly).  It is downloaded
into a cache folder on first use (`--original_dir` points at any other copy of
the original package) and never imported into this process: workers get it on
their PYTHONPATH.  Both are driven through the same public API, so the timed
code is identical apart from the library underneath.

Tasks:
  train      one training step: forward, hybrid loss, backward, AdamW, EMA
             (MixedPrecisionTrainer, as TrainLoop.run_step does)
  ddim       DDIM sampling, 25 respaced steps
  ddpm       DDPM (ancestral) sampling, 50 respaced steps
  nll        calc_bpd_loop on one image (batch size 1)
  image_nll  the image_nll.py script end to end on a folder of one image (batch
             size 1): model build and load, data loader, evaluation, outputs
  trainloop  TrainLoop.run_loop for a few steps (including its checkpoint saves)

Training tasks also report the model's FLOPs and, on a GPU, its FLOP utilisation
(MFU): the forward pass's matmul and convolution FLOPs are counted once with
torch's FlopCounterMode, a training step is taken as three forward passes (the
usual convention, so recomputation does not count as useful work), and the
achieved rate is divided by the GPU's dense peak for the precision (the vendor's
datasheet figure; --peak_tflops to give another).
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    # CPU-sized: the configuration of issue 8's measurements.
    "small": dict(
        image_size=32, num_channels=64, num_res_blocks=2, attention_resolutions="16,8",
        learn_sigma=True, class_cond=False, num_heads=4, use_scale_shift_norm=True,
        resblock_updown=False, channel_mult="1,2,2", dropout=0.0, diffusion_steps=1000,
        noise_schedule="cosine", batch_size=16,
    ),
    # The released ADM ImageNet 64x64 class-conditional model.
    "paper64": dict(
        image_size=64, num_channels=192, num_res_blocks=3, attention_resolutions="32,16,8",
        learn_sigma=True, class_cond=True, num_head_channels=64, use_scale_shift_norm=True,
        resblock_updown=True, use_new_attention_order=True, dropout=0.1, diffusion_steps=1000,
        noise_schedule="cosine", batch_size=32,
    ),
    # The released ADM ImageNet 256x256 class-conditional model.
    "paper256": dict(
        image_size=256, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8",
        learn_sigma=True, class_cond=True, num_head_channels=64, use_scale_shift_norm=True,
        resblock_updown=True, dropout=0.0, diffusion_steps=1000, noise_schedule="linear",
        batch_size=8,
    ),
}

TASKS = ("train", "ddim", "ddpm", "nll", "image_nll", "trainloop")

# Dense tensor-core peaks in TFLOP/s from the vendors' datasheets (SXM parts), by
# precision: fp16 and bf16 run at the same rate; "tf32" is fp32 with --tf32.
PEAK_TFLOPS = {
    "H100": {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200": {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"fp16": 312.0, "bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------


def original_dir(cache):
    """Folder holding the original `guided_diffusion` package, fetched once from PyPI
    (by tests/golden/original.py, which the golden parity test uses too)."""
    spec = importlib.util.spec_from_file_location("golden_original", ROOT / "tests" / "golden" / "original.py")
    original = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(original)
    try:
        target = original.fetch(cache)
    except original.Unavailable as err:
        raise SystemExit(f"{err}; pass --original_dir with a copy of the original package, or --impls ours")
    restore_upstream_attention_checkpointing(target / "guided_diffusion" / "unet.py")
    return target


def restore_upstream_attention_checkpointing(unet_file):
    """Undo the one behavioural edit the PyPI package makes to openai/guided-diffusion.

    Upstream's AttentionBlock.forward always checkpoints (`checkpoint(..., True)`,
    with a TODO beside it), so its attention runs twice in every training step; the
    PyPI copy passes `self.use_checkpoint` instead.  Numbers are the same either
    way (the golden scenarios pass with both); only the training time differs.
    """
    text = unet_file.read_text()
    packaged = "return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)"
    upstream = "return checkpoint(self._forward, (x,), self.parameters(), True)"
    if packaged in text:
        unet_file.write_text(text.replace(packaged, upstream, 1))


def run_worker(impl_path, task, args):
    """Run one measurement in a fresh process; return its JSON record."""
    env = dict(os.environ, PYTHONPATH=str(impl_path), OMP_NUM_THREADS=str(args.threads))
    env["GUIDED_DIFFUSION_DISABLE"] = args.disable  # our fast paths to turn off (the original ignores it)
    env.setdefault("OPENAI_LOGDIR", tempfile.mkdtemp(prefix="gd-bench-"))
    proc = subprocess.run(worker_command(impl_path, task, args), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_command(impl_path, task, args):
    """The command line of the worker measuring ``task`` for the implementation at ``impl_path``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", task]
    for flag in ("config", "device", "steps", "threads", "nll_steps", "nll_batch", "peak_tflops"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    cmd += ["--precision", precision_of(impl_path, args)]
    for flag in ("compile", "channels_last", "tf32", "cudnn_benchmark"):
        if getattr(args, flag) and (args.flags_for == "both" or is_ours(impl_path, args)):
            cmd.append(f"--{flag}")
    if args.fused_adam and is_ours(impl_path, args):  # the original has no such option
        cmd.append("--fused_adam")
    return cmd


def is_ours(impl_path, args):
    """Whether ``impl_path`` is this package: this checkout, or the --baseline_dir copy of it."""
    baseline = getattr(args, "baseline_dir", "")
    return impl_path == ROOT or bool(baseline) and impl_path == Path(baseline)


def precision_of(impl_path, args):
    """The precision an implementation runs in (--original_precision can differ for the original)."""
    if not is_ours(impl_path, args) and args.original_precision:
        return args.original_precision
    return args.precision


def drive(args):
    impls = {}
    for name in args.impls.split(","):
        if name == "ours":
            impls[name] = ROOT
        elif name == "original":
            impls[name] = Path(args.original_dir) if args.original_dir else original_dir(args.cache)
        elif name == "baseline" and args.baseline_dir:
            impls[name] = Path(args.baseline_dir)
        else:
            raise SystemExit(f"unknown implementation {name!r}: use ours, original and, with --baseline_dir, "
                             "baseline (--impls)")
    tasks = args.tasks.split(",")
    for task in tasks:
        if task not in TASKS:
            raise SystemExit(f"unknown task {task!r}: choose from {', '.join(TASKS)} (--tasks)")

    records = {(i, t): [] for i in impls for t in tasks}
    for r in range(args.rounds):
        for task in tasks:
            for impl, path in impls.items():
                rec = run_worker(path, task, args)
                records[(impl, task)].append(rec)
                print(f"round {r + 1}/{args.rounds} {task:9s} {impl:8s} "
                      + (f"{rec['images_per_s']:9.2f} img/s  peak {rec['peak_mb']:8.1f} MB"
                         + (f"  MFU {rec['mfu']:.1%}" if rec.get("mfu") is not None else "")
                         if "error" not in rec else f"ERROR {rec['error']}"), file=sys.stderr)

    summary = []
    for task in tasks:
        row = {"task": task}
        for impl in impls:
            good = [x for x in records[(impl, task)] if "error" not in x]
            if not good:
                row[impl] = {"error": records[(impl, task)][0].get("error")}
                continue
            row[impl] = {
                "images_per_s": statistics.median(x["images_per_s"] for x in good),
                "peak_mb": statistics.median(x["peak_mb"] for x in good),
                "rounds": len(good),
                "precision": precision_of(impls[impl], args),
            }
            if "model_gflop_per_image" in good[0]:
                row[impl]["model_gflop_per_image"] = good[0]["model_gflop_per_image"]
                row[impl]["model_tflops"] = statistics.median(x["model_tflops"] for x in good)
                if good[0].get("mfu") is not None:
                    row[impl]["mfu"] = statistics.median(x["mfu"] for x in good)
        if "ours" in row and "original" in row and "error" not in row["ours"] and "error" not in row["original"]:
            row["speedup"] = row["ours"]["images_per_s"] / row["original"]["images_per_s"]
            row["memory_ratio"] = row["ours"]["peak_mb"] / row["original"]["peak_mb"]
        if "baseline" in row and "original" in row and "error" not in row["baseline"] and "error" not in row["original"]:
            row["baseline_speedup"] = row["baseline"]["images_per_s"] / row["original"]["images_per_s"]
        summary.append(row)

    header = f"{'task':10s}" + "".join(f"{impl + ' img/s':>16s}{impl + ' MB':>12s}" for impl in impls)
    header += f"{'speedup':>10s}{'mem':>8s}"
    print(header)
    for row in summary:
        line = f"{row['task']:10s}"
        for impl in impls:
            cell = row[impl]
            line += (f"{cell['images_per_s']:16.2f}{cell['peak_mb']:12.1f}" if "error" not in cell
                     else f"{'error':>16s}{'':>12s}")
        if "speedup" in row:
            line += f"{row['speedup']:9.2f}x{row['memory_ratio']:7.2f}x"
        if "baseline_speedup" in row:
            line += f"  (baseline {row['baseline_speedup']:.2f}x)"
        print(line)
    for row in summary:
        for impl in impls:
            cell = row[impl]
            if "model_tflops" in cell:
                mfu = f", MFU {cell['mfu']:.1%}" if "mfu" in cell else ""
                print(f"{row['task']} {impl} ({cell['precision']}): {cell['model_gflop_per_image']:.1f} model "
                      f"GFLOP per image, {cell['model_tflops']:.1f} TFLOP/s{mfu}")

    meta = {
        "config": args.config, "precision": args.precision, "device": args.device,
        "original_precision": args.original_precision or args.precision,
        "threads": args.threads, "rounds": args.rounds, "compile": args.compile,
        "channels_last": args.channels_last, "tf32": args.tf32, "cudnn_benchmark": args.cudnn_benchmark,
        "nll_batch": args.nll_batch,
        "flags_for": args.flags_for, "fused_adam": args.fused_adam,
        "disable": args.disable, "load_average": os.getloadavg(), "peak_tflops": args.peak_tflops,
        "machine": machine_description(args.device),
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": summary}, indent=2))
        print(f"wrote {Path(args.json).resolve()}")


def machine_description(device):
    import platform

    desc = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if device == "cuda":
        import torch

        desc += f", {torch.cuda.get_device_name()}"
    return desc


# ----------------------------------------------------------------------------
# Worker: runs inside a fresh process, with one implementation on sys.path
# ----------------------------------------------------------------------------


def running_ours():
    """Whether the guided_diffusion this worker imports is the one in this checkout."""
    import guided_diffusion

    return Path(guided_diffusion.__file__).resolve().parent.parent == ROOT


def peak_memory_mb(device):
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build(args, respacing="", **overrides):
    """Model and diffusion of ``args.config`` (with ``overrides`` of its flags), and its batch size."""
    import torch
    from guided_diffusion import script_util

    cfg = dict(CONFIGS[args.config], **overrides)
    batch_size = cfg.pop("batch_size")
    flags = script_util.model_and_diffusion_defaults()
    flags.update({k: v for k, v in cfg.items() if k in flags})
    flags["timestep_respacing"] = respacing
    flags["use_fp16"] = args.precision == "fp16"
    model, diffusion = script_util.create_model_and_diffusion(**flags)
    model.to(args.device)
    if flags["use_fp16"]:
        model.convert_to_fp16()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, diffusion, flags, batch_size


def inputs(args, flags, batch_size):
    import torch

    g = torch.Generator().manual_seed(0)
    size = flags["image_size"]
    x = (torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1).to(args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kwargs = {}
    if flags["class_cond"]:
        kwargs["y"] = torch.randint(0, 1000, (batch_size,), generator=g).to(args.device)
    return x, kwargs


def autocast(args):
    import contextlib

    import torch

    if args.precision == "bf16":
        return torch.autocast(device_type=args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def task_train(args):
    import torch
    from guided_diffusion.fp16_util import MixedPrecisionTrainer
    from guided_diffusion.nn import update_ema
    from guided_diffusion.resample import UniformSampler

    model, diffusion, flags, batch_size = build(args)
    gflop = forward_gflop_per_image(args, model, flags)
    model.train()
    trainer = MixedPrecisionTrainer(model=model, use_fp16=flags["use_fp16"])
    opt = torch.optim.AdamW(trainer.master_params, lr=1e-4, **adamw_options(args.fused_adam))
    ema = [p.detach().clone() for p in trainer.master_params]
    sampler = UniformSampler(diffusion)
    x, kwargs = inputs(args, flags, batch_size)
    net = compile_like_scripts(model) if args.compile else model

    def step():
        trainer.zero_grad()
        t, weights = sampler.sample(batch_size, x.device)
        with autocast(args):
            losses = diffusion.training_losses(net, x, t, model_kwargs=kwargs)
        trainer.backward((losses["loss"] * weights).mean())
        if trainer.optimize(opt):
            update_ema(ema, trainer.master_params, rate=0.9999)

    return add_utilisation(args, timed(args, step, warmup=2, repeats=args.steps, images=batch_size), gflop)


def task_sample(args, ddim):
    import torch

    model, diffusion, flags, batch_size = build(args, respacing="ddim25" if ddim else "50")
    model.eval()
    x, kwargs = inputs(args, flags, batch_size)
    net = compile_like_scripts(model) if args.compile else model
    loop = diffusion.ddim_sample_loop if ddim else diffusion.p_sample_loop

    def run():
        torch.manual_seed(0)
        with autocast(args):
            loop(net, tuple(x.shape), model_kwargs=kwargs, device=x.device)

    return timed(args, run, warmup=1, repeats=1, images=batch_size)


def compile_like_scripts(model):
    """What the implementation's scripts do with --compile (torch.compile if it has no such flag)."""
    import torch

    try:
        from guided_diffusion import perf
    except ImportError:
        return torch.compile(model)
    return perf.compile_model(model, argparse.Namespace(compile=True))


def task_nll(args):
    import inspect

    import torch

    model, diffusion, flags, _ = build(args, diffusion_steps=args.nll_steps)
    model.eval()
    x, kwargs = inputs(args, flags, 1)
    net = compile_like_scripts(model) if args.compile else model
    extra = {}
    if args.nll_batch > 1 and "timesteps_per_call" in inspect.signature(diffusion.calc_bpd_loop).parameters:
        extra["timesteps_per_call"] = args.nll_batch

    def run():
        torch.manual_seed(0)
        with autocast(args):
            diffusion.calc_bpd_loop(net, x, model_kwargs=kwargs, **extra)

    return timed(args, run, warmup=0, repeats=1, images=1)


def task_image_nll(args):
    """image_nll.py at batch size 1 on one image, timed from flag parsing to its last output.

    Ours runs scripts/image_nll.py's main (with --nll_batch). The PyPI package of the
    original has no scripts, so for it the same steps as its image_nll.py are driven
    through its API: dist setup, model build and load, a deterministic data loader,
    calc_bpd_loop per batch with the per-term means gathered across ranks, the
    running bpd logged, and the term means saved as npz.
    """
    import torch
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="gd-bench-nll-"))
    model, _, flags, _ = build(args, diffusion_steps=args.nll_steps)
    torch.save(model.state_dict(), work / "model.pt")
    (work / "data").mkdir()
    size = flags["image_size"]
    pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(work / "data" / "image_0.png")
    del model

    start = time.perf_counter()
    if running_ours():
        argv = [f"--{k}={v}" for k, v in flags.items() if k != "timestep_respacing"]
        argv += [f"--model_path={work / 'model.pt'}", f"--data_dir={work / 'data'}", "--num_samples=1",
                 "--batch_size=1", f"--nll_batch={args.nll_batch}", "--seed=0", f"--log_dir={work / 'log'}"]
        spec = importlib.util.spec_from_file_location("bench_image_nll", ROOT / "scripts" / "image_nll.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(argv)
    else:
        _original_image_nll(flags, work)
    elapsed = time.perf_counter() - start
    return {"images_per_s": 1 / elapsed, "seconds": elapsed}


def _original_image_nll(flags, work):
    """What the original's scripts/image_nll.py does for one image at batch size 1."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from guided_diffusion import dist_util, logger
    from guided_diffusion.image_datasets import load_data
    from guided_diffusion.script_util import create_model_and_diffusion

    dist_util.setup_dist()
    logger.configure(dir=str(work / "log"))
    model, diffusion = create_model_and_diffusion(**flags)
    model.load_state_dict(dist_util.load_state_dict(str(work / "model.pt"), map_location="cpu"))
    model.to(dist_util.dev())
    model.eval()
    data = load_data(data_dir=str(work / "data"), batch_size=1, image_size=flags["image_size"],
                     class_cond=flags["class_cond"], deterministic=True)
    terms = {"vb": [], "mse": [], "xstart_mse": []}
    done, bpds = 0, []
    while done < 1:
        batch, model_kwargs = next(data)
        batch = batch.to(dist_util.dev())
        model_kwargs = {k: v.to(dist_util.dev()) for k, v in model_kwargs.items()}
        metrics = diffusion.calc_bpd_loop(model, batch, clip_denoised=True, model_kwargs=model_kwargs)
        for key, collected in terms.items():
            mean = metrics[key].mean(dim=0)
            gathered = [torch.zeros_like(mean) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, mean)
            collected.extend(g.cpu().numpy() for g in gathered)
        total = metrics["total_bpd"].mean() / dist.get_world_size()
        dist.all_reduce(total)
        bpds.append(total.item())
        done += dist.get_world_size() * batch.shape[0]
        logger.log(f"done {done} samples: bpd={np.mean(bpds)}")
    if dist.get_rank() == 0:
        for key, collected in terms.items():
            np.savez(str(work / "log" / f"{key}_terms.npz"), np.mean(np.stack(collected), axis=0))


def task_trainloop(args):
    from guided_diffusion import dist_util, logger
    from guided_diffusion.train_util import TrainLoop

    dist_util.setup_dist()
    logger.configure(dir=tempfile.mkdtemp(prefix="gd-bench-loop-"), format_strs=["log"])
    model, diffusion, flags, batch_size = build(args)
    gflop = forward_gflop_per_image(args, model, flags)
    x, kwargs = inputs(args, flags, batch_size)

    def data():
        while True:
            yield x, kwargs

    loop = TrainLoop(
        model=model, diffusion=diffusion, data=data(), batch_size=batch_size, microbatch=-1,
        lr=1e-4, ema_rate="0.9999", log_interval=10**9, save_interval=10**9, resume_checkpoint="",
        use_fp16=flags["use_fp16"], lr_anneal_steps=args.steps,
        **ours_trainloop_options(args),
    )
    sync(args.device)
    start = time.perf_counter()
    loop.run_loop()
    sync(args.device)
    elapsed = time.perf_counter() - start
    return add_utilisation(args, {"images_per_s": batch_size * args.steps / elapsed, "seconds": elapsed}, gflop)


def ours_trainloop_options(args):
    """TrainLoop options only ours has: its bf16, compile and fused-AdamW switches."""
    options = {}
    if not running_ours():
        return options
    if args.fused_adam:
        options["fused_adam"] = True
    if args.precision == "bf16":
        options["use_bf16"] = True
    if args.compile:
        options["compile"] = True
    return options


def adamw_options(fused=False):
    """The AdamW options the implementation's own TrainLoop uses (the original: torch's defaults)."""
    if not running_ours():  # (the original's train_util needs blobfile and mpi4py just to import)
        return {}
    from guided_diffusion import train_util

    return train_util._adamw_speed_options(fused)


def forward_gflop_per_image(args, model, flags):
    """Matmul and convolution GFLOPs of one forward pass per image, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x, kwargs = inputs(args, flags, 2)
    t = torch.tensor([1, flags["diffusion_steps"] // 2], device=x.device)
    with torch.no_grad(), autocast(args), FlopCounterMode(display=False) as counter:
        model(x, t, **kwargs)
    return counter.get_total_flops() / 2 / 1e9


def peak_tflops(args):
    """The dense peak of the GPU for the run's precision (None on CPU or an unknown GPU)."""
    if args.peak_tflops > 0:
        return args.peak_tflops
    if args.device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    kind = args.precision if args.precision != "fp32" else ("tf32" if args.tf32 else "fp32")
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table[kind]
    return None


def add_utilisation(args, record, gflop_per_image):
    """Model FLOPs of a training step (3 forward passes per image), TFLOP/s achieved, and MFU."""
    tflops = 3 * gflop_per_image * record["images_per_s"] / 1e3
    peak = peak_tflops(args)
    record.update(model_gflop_per_image=3 * gflop_per_image, model_tflops=tflops,
                  peak_tflops=peak, mfu=tflops / peak if peak else None)
    return record


def timed(args, fn, warmup, repeats, images):
    for _ in range(warmup):
        fn()
    sync(args.device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(args.device)
    elapsed = time.perf_counter() - start
    return {"images_per_s": images * repeats / elapsed, "seconds": elapsed}


def worker(args):
    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        torch.cuda.reset_peak_memory_stats()
    runners = {
        "train": task_train,
        "ddim": lambda a: task_sample(a, ddim=True),
        "ddpm": lambda a: task_sample(a, ddim=False),
        "nll": task_nll,
        "image_nll": task_image_nll,
        "trainloop": task_trainloop,
    }
    record = runners[args.worker](args)
    record["peak_mb"] = peak_memory_mb(args.device)
    print(json.dumps(record))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=sorted(CONFIGS), help="model configuration")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--impls", default="ours,original", help="comma-separated: ours, original, baseline")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="fp16 is the original's scheme (fp16 torso, fp32 master weights); bf16 is autocast")
    p.add_argument("--original_precision", default="", choices=["", "fp32", "fp16", "bf16"],
                   help="the original's precision when it differs from --precision (e.g. ours in bf16 "
                        "against the original's own fp16 scheme)")
    p.add_argument("--peak_tflops", type=float, default=0.0,
                   help="the accelerator's dense peak for the MFU figure (default: the datasheet value of "
                        "a known GPU for the precision; none on CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the median is reported")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per measurement")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--nll_steps", type=int, default=1000, help="diffusion steps of the NLL task")
    p.add_argument("--nll_batch", type=int, default=1,
                   help="timesteps evaluated per model call in the NLL task (ours only; 1 = the original's way)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--channels_last", action="store_true", help="channels-last memory format")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convolutions on GPU")
    p.add_argument("--cudnn_benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms per shape and keep the fastest (GPU)")
    p.add_argument("--fused_adam", action="store_true",
                   help="ours only: the fused AdamW kernel of --fused_adam (CPU and GPU; rounds differently)")
    p.add_argument("--flags_for", default="both", choices=["both", "ours"],
                   help="apply --compile/--channels_last/--tf32/--cudnn_benchmark to both implementations "
                        "or to ours only (ours with its flags against the original as published)")
    p.add_argument("--disable", default="",
                   help="comma-separated fast paths of ours to turn off (guided_diffusion/perf.py FAST_PATHS; "
                        "'all' for every one)")
    p.add_argument("--json", default="", help="write the results to this JSON file")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "guided_diffusion_bench"),
                   help="where the original package is downloaded")
    p.add_argument("--original_dir", default="", help="folder that contains the original guided_diffusion package")
    p.add_argument("--baseline_dir", default="",
                   help="another checkout of this package (e.g. `git worktree add /tmp/before REV`), measured "
                        "as implementation 'baseline' in the same interleaved rounds: before/after figures")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
