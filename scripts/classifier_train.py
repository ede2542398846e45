"""Train a noisy-image classifier (for classifier guidance) on a folder of labelled images.

Labels come from the file names (``cat_001.png`` -> class ``cat``). With
``--noised True`` (default) each batch is noised to random diffusion timesteps so
that the classifier can guide sampling. Runs on CPU or GPU, under mpiexec or
torchrun; see docs/training.md.
"""

import argparse
import os
import sys

try:
    import guided_diffusion  # noqa: F401
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
from torch.nn.parallel.distributed import DistributedDataParallel as DDP

from guided_diffusion import checkpoints, dist_util, errors, logger, perf, preemption
from guided_diffusion.fp16_util import MixedPrecisionTrainer
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    classifier_and_diffusion_defaults,
    classifier_extra_defaults,
    create_classifier_and_diffusion,
)
from guided_diffusion.train_util import (
    load_set_member,
    log_loss_dict,
    next_batch,
    parse_resume_step_from_filename,
    parse_training_args,
    resolve_resume_checkpoint,
    start_run,
    training_data,
    training_extra_defaults,
    write_set_on_rank0,
)


def top_k_accuracy(logits, labels, k):
    """Per-example 1.0 when the label is among the ``k`` highest logits, else 0.0."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == labels[:, None]).any(dim=-1).float()


class ClassifierTrainer:
    """Cross-entropy training of a (noisy-image) classifier with the diffusion's noising."""

    def __init__(self, args, model, diffusion):
        self.args = args
        self.diffusion = diffusion
        self.sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion) if args.noised else None
        self.resume_step = 0
        self.last_saved = None  # the model file of the newest set written (rank 0)
        self.resume_checkpoint = resolve_resume_checkpoint(args.resume_checkpoint,
                                                           allow_partial=args.allow_partial_resume)
        if self.resume_checkpoint:
            self.resume_step = parse_resume_step_from_filename(self.resume_checkpoint)
            logger.log(f"loading model from checkpoint: {self.resume_checkpoint}... at {self.resume_step} step")
            state_dict = load_set_member(self.resume_checkpoint, map_location=dist_util.dev())
            checkpoints.load_model_weights(model, state_dict, source=self.resume_checkpoint)
        dist_util.sync_params(model.parameters())
        self.mp_trainer = MixedPrecisionTrainer(
            model=model, use_fp16=args.classifier_use_fp16, initial_lg_loss_scale=16.0
        )
        self.model = model
        if dist_util.get_world_size() > 1:
            on_gpu = dist_util.dev().type == "cuda"
            self.model = DDP(
                model,
                device_ids=[dist_util.dev()] if on_gpu else None,
                output_device=dist_util.dev() if on_gpu else None,
                bucket_cap_mb=128,
                find_unused_parameters=False,
            )
        self.model = perf.compile_model(self.model, args)
        adam_options = {"fused": True} if getattr(args, "fused_adam", False) else {"foreach": perf.enabled("foreach")}
        self.opt = torch.optim.AdamW(
            self.mp_trainer.master_params, lr=args.lr, weight_decay=args.weight_decay, **adam_options
        )
        if self.resume_checkpoint:
            opt_path = os.path.join(os.path.dirname(self.resume_checkpoint), f"opt{self.resume_step:06d}.pt")
            if os.path.exists(opt_path):
                logger.log(f"loading optimizer state from checkpoint: {opt_path}")
                self.opt.load_state_dict(load_set_member(opt_path, map_location=dist_util.dev()))
            else:
                logger.warn(f"no optimizer file {opt_path}; AdamW starts from a fresh state.")

    def _noised(self, batch):
        if self.sampler is None:
            return batch, torch.zeros(batch.shape[0], dtype=torch.long, device=dist_util.dev())
        t, _ = self.sampler.sample(batch.shape[0], dist_util.dev())
        return self.diffusion.q_sample(batch, t), t

    def forward_backward_log(self, data, prefix="train"):
        """One batch: losses and accuracies logged under ``prefix``; gradients only when training."""
        batch, extra = next_batch(data, getattr(self.args, "num_classes", None))
        labels = extra["y"].to(dist_util.dev())
        batch, t = self._noised(batch.to(dist_util.dev()))
        microbatch = self.args.microbatch if self.args.microbatch > 0 else batch.shape[0]
        for i in range(0, batch.shape[0], microbatch):
            sub_batch, sub_labels, sub_t = batch[i : i + microbatch], labels[i : i + microbatch], t[i : i + microbatch]
            with perf.autocast(self.args, dist_util.dev()):
                logits = self.model(sub_batch, timesteps=sub_t)
            loss = F.cross_entropy(logits, sub_labels, reduction="none")
            log_loss_dict(self.diffusion, sub_t, {
                f"{prefix}_loss": loss.detach(),
                f"{prefix}_acc@1": top_k_accuracy(logits, sub_labels, 1),
                f"{prefix}_acc@5": top_k_accuracy(logits, sub_labels, 5),
            })
            if loss.requires_grad:
                if i == 0:
                    self.mp_trainer.zero_grad()
                self.mp_trainer.backward(loss.mean() * len(sub_batch) / len(batch))

    def save(self, step):
        """Write model and optimizer files of ``step`` (the model file appears last); all ranks call."""
        def files():
            model = self.mp_trainer.master_params_to_state_dict(self.mp_trainer.master_params)
            return dict(model=model, emas=[], opt=self.opt.state_dict(), state=None)

        self.last_saved = write_set_on_rank0(logger.get_dir(), step, self.args.keep_checkpoints, files) or self.last_saved

    def run(self, data, val_data):
        """Train to ``--iterations`` (or ``--max_steps``); a ``--save_on_signal`` signal saves and exits 75."""
        args = self.args
        total = args.iterations - self.resume_step
        if args.max_steps:
            total = min(total, args.max_steps - self.resume_step)
        stop_request = preemption.StopRequest(args.save_on_signal)
        step = 0
        with stop_request:
            for step in range(max(total, 0)):
                global_step = step + self.resume_step
                logger.logkv("step", global_step)
                logger.logkv("samples", (global_step + 1) * args.batch_size * dist_util.get_world_size())
                if args.anneal_lr:
                    for group in self.opt.param_groups:
                        group["lr"] = args.lr * (1 - global_step / args.iterations)
                with stop_request.deferred():  # data workers started here must outlive the signal
                    self.forward_backward_log(data)
                    self.mp_trainer.optimize(self.opt)
                    if val_data is not None and step % args.eval_interval == 0:
                        self.model.eval()
                        with torch.no_grad():
                            self.forward_backward_log(val_data, prefix="val")
                        self.model.train()
                if step % args.log_interval == 0:
                    logger.dumpkvs()
                if step and global_step % args.save_interval == 0:
                    self.save(global_step)
                if stop_request.requested():
                    break
            final = self.resume_step + (step + 1 if total > 0 else 0)
            self.save(final)
            if stop_request.requested():
                stop = stop_request.preempted(self.last_saved, os.path.abspath(logger.get_dir()))
                logger.log(str(stop))
                raise stop


def main(argv=None):
    args = parse_training_args(create_argparser(), argv, purpose=None)
    start_run(args, purpose="classifier training")

    logger.log("creating model and diffusion...")
    keys = list(classifier_and_diffusion_defaults()) + list(classifier_extra_defaults())
    model, diffusion = create_classifier_and_diffusion(**args_to_dict(args, keys))
    model.to(dist_util.dev())
    perf.configure_backends(args, dist_util.dev())
    perf.prepare_model(model, args)
    trainer = ClassifierTrainer(args, model, diffusion)

    logger.log("creating data loader...")
    data = training_data(args, image_size=args.image_size, class_cond=True, random_crop=True,
                         in_channels=args.in_channels)
    val_data = None
    if args.val_data_dir:
        val_args = argparse.Namespace(**{**vars(args), "data_dir": args.val_data_dir, "seed": args.seed + 1})
        val_data = training_data(val_args, image_size=args.image_size, class_cond=True, in_channels=args.in_channels)

    logger.log("training classifier model...")
    trainer.run(data, val_data)


def create_argparser():
    defaults = dict(
        data_dir="",
        val_data_dir="",
        noised=True,
        iterations=150000,
        lr=3e-4,
        weight_decay=0.0,
        anneal_lr=False,
        batch_size=4,
        microbatch=-1,
        schedule_sampler="uniform",
        resume_checkpoint="",
        log_interval=10,
        eval_interval=5,
        save_interval=10000,
    )
    defaults.update(classifier_and_diffusion_defaults())
    defaults.update(classifier_extra_defaults())
    defaults.update(training_extra_defaults())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    perf.add_perf_flags(parser, training=True)
    return parser


if __name__ == "__main__":
    errors.run_main(main)
