"""The diffusion training loop: AdamW, EMA, microbatches, data parallel, checkpoints, exact resume.

Checkpoints keep the original's names and formats in the log dir:
``model{step:06d}.pt`` (weights), ``ema_{rate}_{step:06d}.pt`` (one per EMA rate)
and ``opt{step:06d}.pt`` (AdamW state). Beside them this port writes
``state{step:06d}.pt``, a small file with what an exact resume needs (the global
step, the RNG states of every rank, the loss scale, the position in the data
stream, the schedule sampler's history, the list of the set's files). The model
file is renamed into place last, once the others are durable, so a visible model
file always has its whole set (`checkpoint_sets`); a folder or ``auto`` resumes
from the newest complete set, and an incomplete one is refused.

With ``save_on_signal`` (the scripts' ``--save_on_signal``, SIGTERM and SIGUSR1 by
default) a signal stops every rank after the current iteration; a complete set is
written and `preemption.TrainingPreempted` exits with status 75 (`preemption`).

Resuming from a set with a state file continues exactly where the run stopped:
on CPU in float32, N steps straight and N/2 steps + kill + resume give
bit-identical weights, EMA and optimizer state (the data iterator must be
deterministic given its seed, e.g. wrapped in `IsolatedRNGIterator`). A set
without it (the original's checkpoints) resumes like the original did.

A file ``model{N}.pt`` holds the weights after the training iteration with
index N (iterations count from 0), except the final save of a run, which is
named after the number of iterations done (the original's convention).
"""

import contextlib
import copy
import functools
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel.distributed import DistributedDataParallel as DDP

from . import checkpoint_sets, checkpoints, dist_util, fastpaths, logger, perf, preemption
from .errors import is_usage_error, usage
from .fp16_util import MixedPrecisionTrainer, TrainingDivergedError
from .image_datasets import load_data
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler
from .script_util import add_preset_argument, parse_args_with_presets

STATE_FORMAT = 1
# Test hook: "SECONDS" or "SECONDS@STEP": sleep after every file event of a checkpoint
# save (each temporary file written, each rename; of that step only, with @STEP), so
# that a test can kill the process in the middle of a save.
SAVE_PAUSE_ENV = "GUIDED_DIFFUSION_SAVE_PAUSE"


# ---------------------------------------------------------------------------
# The original's module functions


def parse_resume_step_from_filename(filename):
    """The digits between the last ``model`` and the following ``.`` in ``filename``, else 0.

    ``"path/model000123.pt"`` -> 123; names without such digits give 0.
    """
    parts = filename.split("model")
    if len(parts) < 2:
        return 0
    digits = parts[-1].split(".")[0]
    try:
        return int(digits)
    except ValueError:
        return 0


def get_blob_logdir():
    """Where checkpoints are written: the logger's directory."""
    return logger.get_dir()


def find_resume_checkpoint():
    """Hook for automatic resumption on a cluster; returns None (resume with --resume_checkpoint)."""
    return None


def find_ema_checkpoint(main_checkpoint, step, rate):
    """Path of ``ema_{rate}_{step:06d}.pt`` beside ``main_checkpoint``, or None if absent."""
    if main_checkpoint is None:
        return None
    path = os.path.join(os.path.dirname(main_checkpoint), f"ema_{rate}_{step:06d}.pt")
    return path if os.path.exists(path) else None


def log_loss_dict(diffusion, ts, losses):
    """Log the batch mean of every loss term and its mean per timestep quartile (``{key}_q0..3``).

    Everything logged crosses to the host in one transfer, timesteps included (one
    device synchronisation per call; the original made three per term).
    """
    _log_losses(diffusion, ts, losses)


def _log_losses(diffusion, ts, losses, extra=()):
    """`log_loss_dict`, also bringing the float32 scalars ``extra`` to the host in the
    same transfer; returns their values (a numpy array)."""
    keys = list(losses)
    values = [losses[k].detach().reshape(-1) for k in keys]
    dtype = functools.reduce(torch.promote_types, [v.dtype for v in values], torch.float32)
    parts = [v.to(dtype) for v in values]
    if keys:
        # Timesteps travel as floats: exact for every step count below 2**24.
        parts += [torch.stack([v.mean() for v in values]).to(dtype), ts.detach().reshape(-1).to(dtype)]
    parts += [e.detach().reshape(1).to(dtype) for e in extra]
    if not parts:
        return np.zeros(0, dtype=np.float32)
    host = torch.cat(parts).cpu().numpy()
    pieces = np.split(host, np.cumsum([p.numel() for p in parts])[:-1])  # views, one per part
    if keys:
        means, steps = pieces[len(keys)], pieces[len(keys) + 1]
        quartiles = 4 * steps.astype(np.int64) // diffusion.num_timesteps
        for key, per_sample, mean in zip(keys, pieces, means):
            logger.logkv_mean(key, mean.item())
            for quartile, value in zip(quartiles, per_sample):
                logger.logkv_mean(f"{key}_q{int(quartile)}", value)
    return host[len(host) - len(extra):]


# ---------------------------------------------------------------------------
# Checkpoint sets (written, found and checked by `checkpoint_sets`)


def find_latest_checkpoint(directory):
    """The ``model*.pt`` of the newest complete set in ``directory``, or None."""
    return checkpoint_sets.find_latest(directory)


def resolve_resume_checkpoint(path, *, allow_partial=False, log_dir=None):
    """Map ``--resume_checkpoint`` to the model file to load ("" for none).

    ``path`` is a folder (its newest complete set), any file of a set, or ``auto``:
    the newest complete set in ``log_dir`` (default: the logger's), "" when there is
    none, so that one command line starts a run and resumes it after preemption. An
    incomplete set is refused unless ``allow_partial`` (see `checkpoint_sets.resolve`).
    """
    if path == "auto":
        return find_latest_checkpoint(log_dir or get_blob_logdir()) or ""
    if not path:
        return ""
    return checkpoint_sets.resolve(path, allow_partial=allow_partial)


def state_path_for(model_path):
    digits = checkpoint_sets.set_step(model_path)
    if digits is None:
        return None
    return os.path.join(os.path.dirname(model_path), f"state{digits}.pt")


def write_checkpoint_set(folder, name, *, model, emas, opt, state):
    """Write the set ``name`` (its step) into ``folder``; the model file appears last, once the
    EMAs, optimizer and state files are durable (`checkpoint_sets.write_set`).

    ``emas`` gives ``(rate, make_state_dict)`` pairs. Returns the model file's path.
    """
    logger.log(f"saving checkpoint set {name:06d} (EMA rates {', '.join(str(r) for r, _ in emas) or 'none'})...")
    return checkpoint_sets.write_set(folder, name, model=model, emas=emas, opt=opt, state=state,
                                     on_event=lambda path, stage: _test_pause(name))


def write_set_on_rank0(folder, name, keep, files):
    """Rank 0 writes the checkpoint set ``name`` into ``folder`` from ``files()`` (the keyword
    arguments of `write_checkpoint_set`) and then keeps only the newest ``keep`` sets (0: all);
    every rank learns whether the save failed and raises alike (all ranks call). Returns the
    model file on rank 0, None elsewhere."""
    failure = path = None
    if dist_util.is_main_process():
        try:
            path = write_checkpoint_set(folder, name, **files())
        except checkpoint_sets.CheckpointSaveError as err:
            failure = err
        else:
            if keep:
                checkpoint_sets.prune(folder, keep)
    if dist_util.any_rank(failure is not None):  # also the barrier after the save
        raise failure or checkpoint_sets.CheckpointSaveError(
            f"rank 0 could not write checkpoint set {name:06d}; its error line says why. Training stopped."
        )
    return path


def load_set_member(path, **kwargs):
    """`dist_util.load_state_dict` of a checkpoint-set file; a damaged file gives one line naming it
    and the newest intact set (all ranks must call)."""
    try:
        return dist_util.load_state_dict(path, **kwargs)
    except checkpoints.CheckpointError as err:
        raise checkpoints.CheckpointError(checkpoint_sets.damaged_message(path, err)) from None


def _check_labels(cond, num_classes):
    labels = cond.get("y") if num_classes else None
    if labels is not None and labels.numel() and int(labels.max()) >= num_classes:
        raise usage(ValueError(
            f"--data_dir holds class {int(labels.max())} (classes are the file-name prefixes before '_', numbered "
            f"from 0 in sorted order), but --num_classes is {num_classes}: set --num_classes to the number of "
            "classes in the data, or rename the files"
        ))


def next_batch(data, num_classes=None):
    """``next(data)``, its labels checked against ``num_classes``; a data error of the user's (a bad
    image file, a class out of range) on any rank stops every rank, as one line each (all ranks call)."""
    batch, error = None, None
    try:
        batch = next(data)
        _check_labels(batch[1], num_classes)
    except Exception as err:
        if not is_usage_error(err) or dist_util.get_world_size() == 1:
            raise
        error = err
    if dist_util.any_rank(error is not None):
        messages = dist_util.all_gather_objects(None if error is None else str(error))
        if error is not None:
            raise error
        rank, text = next((r, m) for r, m in enumerate(messages) if m)
        raise usage(ValueError(f"(rank {rank}) {text}"))
    return batch


def read_state_file(model_path):
    """The state file of the set of ``model_path`` (a dict), or None when the set has none."""
    path = state_path_for(model_path)
    if path is None or not os.path.exists(path):
        return None
    state = load_set_member(path, map_location="cpu")
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: unknown state file format {state.get('format')!r}; expected {STATE_FORMAT}")
    return state


def _test_pause(name_step):
    value = os.environ.get(SAVE_PAUSE_ENV, "")
    if not value:
        return
    seconds, _, step = value.partition("@")
    if not step or int(step) == name_step:
        time.sleep(float(seconds))


# ---------------------------------------------------------------------------
# Random number generators


def seed_all(seed):
    """Seed python's ``random``, numpy's legacy global generator and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state():
    """The global RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state):
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class IsolatedRNGIterator:
    """Wrap a batch iterator so that it draws from its own RNG streams, seeded by ``seed``.

    The data pipeline's randomness (shuffling, DataLoader worker seeds, crops,
    flips) then no longer depends on how many random numbers training drew, so
    the stream of batches is a function of ``seed`` alone and can be fast-forwarded
    on resume. Global torch/numpy/python RNG states are swapped around every
    ``next()``.
    """

    def __init__(self, iterable, seed):
        self._it = iter(iterable)
        outer = capture_rng_state()
        seed_all(seed)
        self._state = capture_rng_state()
        restore_rng_state(outer)

    def __iter__(self):
        return self

    def __next__(self):
        outer = capture_rng_state()
        restore_rng_state(self._state)
        try:
            return next(self._it)
        finally:
            self._state = capture_rng_state()
            restore_rng_state(outer)


def skip_batches(data, count):
    """Advance the batch iterator ``data`` by ``count`` batches (with its own ``skip`` if it has one)."""
    if hasattr(data, "skip"):
        data.skip(count)
        return
    for _ in range(count):
        next(data)


def _sampler_state(sampler):
    if hasattr(sampler, "state_dict"):
        return sampler.state_dict()
    state = {}
    for name in ("_loss_history", "_loss_counts"):
        if isinstance(getattr(sampler, name, None), np.ndarray):
            state[name] = torch.from_numpy(getattr(sampler, name).copy())
    return state


def _load_sampler_state(sampler, state):
    if hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(state)
        return
    for name, value in state.items():
        setattr(sampler, name, value.numpy().copy())


# ---------------------------------------------------------------------------
# The loop


def drop_labels(labels, prob, key):
    """``labels`` with each replaced by the null label -1 with probability ``prob`` (label dropout for
    classifier-free guidance, Ho & Salimans 2022), drawn from a generator seeded by the integer ``key``.
    TrainLoop's key is (seed, global step, rank, microbatch offset), so an exact resume repeats the
    draws without saving any state."""
    generator = torch.Generator().manual_seed(key % 2**63)
    dropped = torch.rand(labels.shape[0], generator=generator) < prob
    return labels.masked_fill(dropped.to(labels.device), -1)


def _parse_ema_rates(ema_rate):
    if isinstance(ema_rate, (int, float)):
        return [float(ema_rate)]
    try:
        return [float(x) for x in str(ema_rate).split(",") if x.strip()]
    except ValueError:
        raise usage(ValueError(
            f"--ema_rate must be a number or comma-separated numbers like 0.9999 or 0.999,0.9999; got {ema_rate!r}"
        )) from None


def _update_ema(targets, sources, rate):
    """target = rate * target + (1 - rate) * source, for every pair at once (fast path ``foreach``)."""
    update_ema(targets, sources, rate)


class TrainLoop:
    """Train ``model`` on batches from ``data`` (an iterator of ``(images, cond_dict)``).

    Arguments are the original's (same names and defaults); beyond them
    ``max_steps`` stops after that many iterations (counted over resumes; 0: no
    limit) and ``restore_data_position`` (default True) fast-forwards ``data`` on an
    exact resume by the number of batches the earlier run consumed.
    """

    def __init__(
        self,
        *,
        model,                      # the network (already on dist_util.dev())
        diffusion,                  # GaussianDiffusion / SpacedDiffusion giving training_losses
        data,                       # iterator of (batch NCHW, cond dict) for this rank
        batch_size,                 # batch per rank per iteration
        microbatch,                 # split each batch in chunks of this size (<= 0: no split)
        lr,                         # AdamW learning rate
        ema_rate,                   # float or comma-separated floats
        log_interval,               # dump logged values every N iterations
        save_interval,              # write a checkpoint set every N iterations
        resume_checkpoint,          # "" or a checkpoint file / log dir to resume from
        use_fp16=False,             # float16 torso, float32 masters, loss scaling
        fp16_scale_growth=1e-3,     # growth of lg_loss_scale per successful step
        schedule_sampler=None,      # timestep sampler (uniform when None)
        weight_decay=0.0,           # AdamW weight decay
        lr_anneal_steps=0,          # decay lr linearly to 0 over this many iterations and stop (0: off)
        max_steps=0,                # stop after this many iterations (0: no limit)
        restore_data_position=True, # on exact resume, skip the batches already consumed
        compile=False,              # torch.compile the network for the forward/backward passes
        use_bf16=False,             # bfloat16 autocast around the forward pass (not with use_fp16)
        fused_adam=False,           # fused AdamW kernel (CPU or GPU; rounds differently from the original)
        class_dropout_prob=0.0,     # share of labels replaced by the null label -1 (classifier-free guidance)
        seed=0,                     # seeds the label dropout (with the step, rank and microbatch)
        allow_partial_resume=False, # resume from an incomplete set as the original did (else refused)
        keep_checkpoints=0,         # keep the newest N complete sets, delete older ones (0: keep all)
        save_on_signal="",          # e.g. "TERM,USR1": on these signals save a set and exit with status 75
    ):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = _parse_ema_rates(ema_rate)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.max_steps = max_steps
        self.restore_data_position = restore_data_position
        self.use_bf16 = use_bf16
        if not 0.0 <= class_dropout_prob < 1.0:
            raise usage(ValueError(
                f"--class_dropout_prob must be in [0, 1), e.g. 0.1 for classifier-free guidance; got {class_dropout_prob}"
            ))
        self.class_dropout_prob = class_dropout_prob
        self.seed = seed
        if keep_checkpoints < 0:
            raise usage(ValueError(f"--keep_checkpoints must be 0 (keep all) or a positive count; got {keep_checkpoints}"))
        self.keep_checkpoints = keep_checkpoints
        self.stop_request = preemption.StopRequest(save_on_signal)
        perf.check_flags(_Flags(use_bf16=use_bf16, use_fp16=use_fp16), dist_util.dev())
        if log_interval <= 0 or save_interval <= 0:
            raise usage(ValueError(
                f"--log_interval and --save_interval must be positive; got {log_interval} and {save_interval}"
            ))

        self.step = 0               # iterations done by this process
        self.resume_step = 0        # global index of this process's first iteration
        self.global_batch = batch_size * dist_util.get_world_size()
        self.batches_consumed = 0   # position in the data stream
        self.resume_checkpoint = resolve_resume_checkpoint(resume_checkpoint, allow_partial=allow_partial_resume)
        self._loaded_name_step = 0
        self._resume_state = None
        self._last_saved = None
        self._pending_skip = 0

        self._load_and_sync_parameters()
        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model, use_fp16=self.use_fp16, fp16_scale_growth=fp16_scale_growth
        )
        self.opt = torch.optim.AdamW(
            self.mp_trainer.master_params, lr=self.lr, weight_decay=self.weight_decay, **_adamw_speed_options(fused_adam)
        )
        if self.resume_checkpoint:
            self._load_optimizer_state()
            self.ema_params = [self._load_ema_parameters(rate) for rate in self.ema_rate]
            self._load_resume_state()
        else:
            self.ema_params = [copy.deepcopy(self.mp_trainer.master_params) for _ in self.ema_rate]

        self.use_ddp = dist_util.get_world_size() > 1
        if self.use_ddp:
            on_gpu = dist_util.dev().type == "cuda"
            self.ddp_model = DDP(
                self.model,
                device_ids=[dist_util.dev()] if on_gpu else None,
                output_device=dist_util.dev() if on_gpu else None,
                bucket_cap_mb=128,
                find_unused_parameters=False,
            )
        else:
            self.ddp_model = self.model
        if compile:
            # The compiled wrapper shares the parameters; checkpoints still come from self.model.
            self.ddp_model = perf.compile_module(self.ddp_model, dist_util.dev())

    # -- resume -----------------------------------------------------------

    def _load_and_sync_parameters(self):
        if self.resume_checkpoint:
            self._loaded_name_step = parse_resume_step_from_filename(self.resume_checkpoint)
            self.resume_step = self._loaded_name_step
            logger.log(f"loading model from checkpoint: {self.resume_checkpoint}...")
            state_dict = load_set_member(self.resume_checkpoint, map_location=dist_util.dev())
            checkpoints.load_model_weights(self.model, state_dict, source=self.resume_checkpoint)
        dist_util.sync_params(self.model.parameters())

    def _load_ema_parameters(self, rate):
        path = find_ema_checkpoint(self.resume_checkpoint, self._loaded_name_step, rate)
        if path is None:
            logger.warn(
                f"no EMA file ema_{rate}_{self._loaded_name_step:06d}.pt beside {self.resume_checkpoint}; "
                f"the EMA with rate {rate} restarts from the loaded weights."
            )
            return copy.deepcopy(self.mp_trainer.master_params)
        logger.log(f"loading EMA from checkpoint: {path}...")
        state_dict = load_set_member(path, map_location=dist_util.dev())
        return [p.detach().clone() for p in self.mp_trainer.state_dict_to_master_params(state_dict)]

    def _load_optimizer_state(self):
        path = os.path.join(os.path.dirname(self.resume_checkpoint), f"opt{self._loaded_name_step:06d}.pt")
        if not os.path.exists(path):
            logger.warn(f"no optimizer file {path}; AdamW starts from a fresh state.")
            return
        logger.log(f"loading optimizer state from checkpoint: {path}")
        self.opt.load_state_dict(load_set_member(path, map_location=dist_util.dev()))

    def _load_resume_state(self):
        state = read_state_file(self.resume_checkpoint)
        if state is None:
            logger.log("no state file beside the checkpoint: resuming like the original (RNG not restored)")
            return
        self.resume_step = int(state["next_step"])
        self.mp_trainer.lg_loss_scale = float(state["lg_loss_scale"])
        self.mp_trainer.consecutive_overflows = int(state.get("consecutive_overflows", 0))
        if state.get("sampler"):
            _load_sampler_state(self.schedule_sampler, state["sampler"])
        if self.restore_data_position:
            self._pending_skip = int(state["batches_consumed"])
        self._resume_state = state
        logger.log(f"exact resume from {state_path_for(self.resume_checkpoint)}: next iteration {self.resume_step}")

    def _restore_position(self):
        """Fast-forward the data and restore RNG states (done once, when the loop starts)."""
        if self._pending_skip:
            logger.log(f"skipping {self._pending_skip} batches to continue the data stream where it stopped")
            skip_batches(self.data, self._pending_skip)
            self.batches_consumed = self._pending_skip
            self._pending_skip = 0
        if self._resume_state is not None:
            states = self._resume_state["rng"]
            rank = dist_util.get_rank()
            if len(states) == dist_util.get_world_size():
                restore_rng_state(states[rank])
            else:
                logger.warn(
                    f"the checkpoint holds RNG states of {len(states)} ranks but this job has "
                    f"{dist_util.get_world_size()}; random streams are not restored"
                )
            self._resume_state = None

    # -- the loop ----------------------------------------------------------

    def _global_step(self):
        return self.step + self.resume_step

    def _should_continue(self):
        idx = self._global_step()
        if self.lr_anneal_steps and idx >= self.lr_anneal_steps:
            return False
        if self.max_steps and idx >= self.max_steps:
            return False
        return True

    def run_loop(self):
        """Train until ``lr_anneal_steps`` / ``max_steps`` (forever if neither is set).

        With ``save_on_signal``, a signal ends the run after the current iteration: a
        complete set is written and `preemption.TrainingPreempted` (exit status 75) raised.
        """
        logger.log(f"training: logging and checkpoints in {os.path.abspath(get_blob_logdir())}")
        with self.stop_request:
            with self.stop_request.deferred():
                self._restore_position()
            tick, images = time.perf_counter(), 0
            last_idx = None
            while self._should_continue():
                idx = self._global_step()
                with self.stop_request.deferred():  # see there: data workers must outlive the signal
                    batch, cond = next_batch(self.data, getattr(self.model, "num_classes", None))
                    self.batches_consumed += 1
                    self.run_step(batch, cond)
                images += self.global_batch
                last_idx = idx
                if idx % self.log_interval == 0:
                    now = time.perf_counter()
                    logger.logkv("images_per_sec", images / max(now - tick, 1e-9))
                    tick, images = now, 0
                    logger.dumpkvs()
                if idx % self.save_interval == 0:
                    self._write_set(idx, next_step=idx + 1)
                self.step += 1
                if self.stop_request.requested():
                    break
            if last_idx is None or last_idx % self.save_interval != 0:
                self.save()
            if self.stop_request.requested():
                stop = self.stop_request.preempted(self._last_saved, os.path.abspath(get_blob_logdir()))
                logger.log(str(stop))
                raise stop

    def run_step(self, batch, cond):
        """One iteration: forward/backward over the microbatches, optimizer step, EMA, lr, logging."""
        self.forward_backward(batch, cond)
        took_step = self.mp_trainer.optimize(self.opt)
        if took_step:
            self._update_ema()
        self._anneal_lr()
        self.log_step()

    def forward_backward(self, batch, cond):
        self.mp_trainer.zero_grad()
        for i in range(0, batch.shape[0], self.microbatch):
            # non_blocking: from the DataLoader's pinned memory the copy overlaps the GPU's
            # work; from ordinary memory it is staged at once. Either way no wait for the GPU.
            micro = batch[i : i + self.microbatch].to(dist_util.dev(), non_blocking=True)
            micro_cond = {k: v[i : i + self.microbatch].to(dist_util.dev(), non_blocking=True)
                          for k, v in cond.items()}
            if self.class_dropout_prob > 0 and "y" in micro_cond:
                micro_cond["y"] = self._drop_labels(micro_cond["y"], i)
            last_batch = (i + self.microbatch) >= batch.shape[0]
            t, weights = self.schedule_sampler.sample(micro.shape[0], dist_util.dev())
            sync = contextlib.nullcontext() if last_batch or not self.use_ddp else self.ddp_model.no_sync()
            with sync, perf.autocast(_Flags(use_bf16=self.use_bf16), dist_util.dev()):
                losses = self.diffusion.training_losses(self.ddp_model, micro, t, model_kwargs=micro_cond)
            if isinstance(self.schedule_sampler, LossAwareSampler):
                self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
            loss = (losses["loss"] * weights).mean()
            # In float32/bf16 the loss is checked for NaN/inf before it reaches the weights
            # (fp16 has its own overflow handling); its value comes back with the logged terms.
            checked = () if self.use_fp16 else (self._loss_to_check(loss),)
            host = _log_losses(self.diffusion, t, {k: v * weights for k, v in losses.items()}, extra=checked)
            if checked:
                self._check_finite(host[0], loss)
            self.mp_trainer.backward(loss)

    def _drop_labels(self, labels, offset):
        key = ((self.seed * 1_000_003 + self._global_step()) * 65_537 + dist_util.get_rank()) * 8_191 + offset
        return drop_labels(labels, self.class_dropout_prob, key)

    def _loss_to_check(self, loss):
        value = loss.detach().float()
        if self.use_ddp:  # every rank must stop together
            shared = value.to(dist_util.comm_device(), copy=True)
            dist.all_reduce(shared)
            value = shared.to(value.device)
        return value

    def _check_finite(self, value, loss):
        if not np.isfinite(value):
            saved = self._last_saved or "none yet"
            raise TrainingDivergedError(
                f"the training loss is {float(loss.detach())} at step {self._global_step()}; training stopped "
                f"before this step changed the weights. Last checkpoint (intact): {saved}. Resume from it "
                "with a lower --lr, or check the data (--data_dir) for broken images."
            )

    def _update_ema(self):
        for rate, params in zip(self.ema_rate, self.ema_params):
            _update_ema(params, self.mp_trainer.master_params, rate)

    def _anneal_lr(self):
        if not self.lr_anneal_steps:
            return
        frac_done = self._global_step() / self.lr_anneal_steps
        lr = self.lr * (1 - frac_done)
        for group in self.opt.param_groups:
            group["lr"] = lr

    def log_step(self):
        logger.logkv("step", self._global_step())
        logger.logkv("samples", (self._global_step() + 1) * self.global_batch)

    # -- saving ----------------------------------------------------------------

    def save(self):
        """Write the checkpoint set of the run so far (rank 0 writes; all ranks must call)."""
        if self.step > 0 or not self.resume_checkpoint:
            name = self._global_step()
        else:
            name = self._loaded_name_step  # nothing trained yet: same name as the loaded set
        self._write_set(name, next_step=self._global_step())

    def _write_set(self, name, next_step):
        state = self._state_dict(next_step)  # every rank takes part: it gathers their RNG states
        to_state_dict = self.mp_trainer.master_params_to_state_dict

        def files():
            return dict(
                model=to_state_dict(self.mp_trainer.master_params),
                emas=[(rate, functools.partial(to_state_dict, params))
                      for rate, params in zip(self.ema_rate, self.ema_params)],
                opt=self.opt.state_dict(), state=state,
            )

        self._last_saved = write_set_on_rank0(get_blob_logdir(), name, self.keep_checkpoints, files) or self._last_saved

    def _state_dict(self, next_step):
        return {
            "format": STATE_FORMAT,
            "next_step": int(next_step),
            "batches_consumed": int(self.batches_consumed),
            "lg_loss_scale": float(self.mp_trainer.lg_loss_scale),
            "consecutive_overflows": int(self.mp_trainer.consecutive_overflows),
            "world_size": dist_util.get_world_size(),
            "rng": dist_util.all_gather_objects(capture_rng_state()),
            "sampler": _sampler_state(self.schedule_sampler),
        }


class _Flags:
    """A stand-in for parsed flags, for the perf helpers."""

    def __init__(self, **flags):
        self.__dict__.update(flags)


def _adamw_speed_options(fused=False):
    """AdamW implementation options: multi-tensor (foreach) by default, fused when asked.

    The foreach implementation rounds exactly like the single-tensor loop that the
    original gets on CPU (and is what it gets on CUDA), so it is a fast path
    (``foreach``). The fused kernel (``--fused_adam``, CPU or GPU) rounds differently.
    """
    if fused:
        return {"fused": True}
    return {"foreach": True} if fastpaths.enabled("foreach") else {"foreach": False}


# ---------------------------------------------------------------------------
# Shared by the training scripts


def diffusion_training_defaults():
    """The original's flags of image_train.py and super_res_train.py (their shared part)."""
    return dict(
        data_dir="",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,  # -1 disables microbatches
        ema_rate="0.9999",  # comma-separated list of EMA values
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        use_fp16=False,
        fp16_scale_growth=1e-3,
    )


def train_loop_from_args(args, *, model, diffusion, data, schedule_sampler):
    """The TrainLoop that the diffusion training scripts run, configured from their flags."""
    return TrainLoop(
        model=model, diffusion=diffusion, data=data, schedule_sampler=schedule_sampler,
        restore_data_position=args.exact_resume, **{name: getattr(args, name) for name in _LOOP_FLAGS},
    )


# TrainLoop's arguments that the training scripts' flags give under the same name.
_LOOP_FLAGS = (
    "batch_size", "microbatch", "lr", "ema_rate", "log_interval", "save_interval", "resume_checkpoint", "use_fp16",
    "fp16_scale_growth", "weight_decay", "lr_anneal_steps", "max_steps", "compile", "use_bf16", "fused_adam",
    "class_dropout_prob", "seed", "allow_partial_resume", "keep_checkpoints", "save_on_signal",
)


def training_extra_defaults():
    """Flags the training scripts add to the original's."""
    return dict(
        max_steps=0,             # stop after this many iterations (0: no limit)
        log_dir="",              # where logs and checkpoints go (default: $OPENAI_LOGDIR, else a temp dir)
        seed=0,                  # seeds the model init, noise and timestep draws (+rank) and the data order
        num_workers=1,           # data loader worker processes
        random_flip=True,        # mirror half of the training images
        skip_bad_images=False,   # skip unreadable images with a warning instead of stopping
        exact_resume=True,       # on resume, fast-forward the data stream to where the run stopped
        class_dropout_prob=0.0,  # train for classifier-free guidance: this share of labels becomes -1
        allow_partial_resume=False,  # resume from an incomplete checkpoint set (refused otherwise)
        keep_checkpoints=0,      # keep the newest N complete checkpoint sets (0: all)
        save_on_signal="TERM,USR1",  # on these signals: save a complete set and exit with status 75
    )


def parse_training_args(parser, argv=None, purpose="train"):
    """Parse a training script's flags; on resume, the run's saved flags become the defaults.

    Precedence, lowest first: script defaults < every flag saved in the
    ``config.json`` beside ``--resume_checkpoint`` (so a resumed run continues
    with the same data, batch size, model...) < ``--preset`` < explicit flags.
    """
    add_preset_argument(parser)
    first, _ = parser.parse_known_args(argv)
    resume = _resume_target(first)
    if resume:
        config = checkpoints.find_config(resume) or {}
        known = {a.dest for a in parser._actions if a.option_strings}
        parser.set_defaults(**{k: v for k, v in config.items() if k in known and k not in ("resume_checkpoint", "preset")})
    auto = getattr(first, "resume_checkpoint", "") == "auto"
    args = parse_args_with_presets(parser, argv, checkpoint_flags=() if auto else ("resume_checkpoint",),
                                   purpose=purpose)
    if auto:
        args.resume_checkpoint = resume
    return args


def _resume_target(first):
    """The model file that the parsed flags ``first`` resume from ("" for none)."""
    path = getattr(first, "resume_checkpoint", "")
    log_dir = getattr(first, "log_dir", "") or os.environ.get("OPENAI_LOGDIR", "")
    if path == "auto" and not log_dir:
        raise usage(ValueError(
            "--resume_checkpoint auto resumes from the log dir, but none is set: pass --log_dir DIR "
            "(the same on every run of the job) or set $OPENAI_LOGDIR"
        ))
    return resolve_resume_checkpoint(path, allow_partial=getattr(first, "allow_partial_resume", False),
                                     log_dir=log_dir)


def start_run(args, purpose="training"):
    """Common start of a training script: process group, log dir, seeds, saved flags.

    Returns the absolute log dir. The flags are saved there as ``config.json`` so
    that sampling scripts can rebuild the model without repeating them.
    """
    dist_util.setup_dist()
    try:  # every rank opens its own log file: each one stops here alike
        logger.configure(dir=args.log_dir or None)
    except OSError as err:
        raise usage(OSError(
            f"cannot write to the log dir {args.log_dir or '(default)'} ({err.strerror or err}: {err.filename}): "
            "make it writable or choose another --log_dir"
        )) from None
    log_dir = os.path.abspath(logger.get_dir())
    logger.log(f"{purpose}: logging to {log_dir}")
    seed_all(args.seed + dist_util.get_rank())
    failed = None
    if dist_util.is_main_process():
        try:
            checkpoints.save_config(log_dir, {k: v for k, v in vars(args).items()})
        except OSError as err:
            failed = err
    if dist_util.any_rank(failed is not None):
        raise usage(OSError(
            f"cannot write to the log dir {log_dir} ({failed or 'see rank 0'}): make it writable or "
            "choose another --log_dir"
        ))
    return log_dir


def training_data(args, **load_kwargs):
    """``image_datasets.load_data`` with the script flags, drawing from its own seeded RNG."""
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        random_flip=args.random_flip,
        skip_bad_images=args.skip_bad_images,
        **load_kwargs,
    )
    return IsolatedRNGIterator(data, seed=args.seed * 1000003 + dist_util.get_rank())
