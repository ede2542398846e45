"""Checkpoint sets in a log dir: written so that they appear whole, found, checked and pruned.

A set is what a training run saves at one step, under the original's names:
``model{N}.pt``, ``ema_{rate}_{N}.pt`` per EMA rate, ``opt{N}.pt``, and this port's
``state{N}.pt`` (N: six or more digits). `write_set` makes the model file, the one
users pass to ``--resume_checkpoint``, appear last, after every other file of the
set is durable (`atomic.atomic_write_set`): whenever the process is killed, a
visible model file has its whole set beside it. The state file lists the set's
files.

A set is *complete* when its model, optimizer and state files and every file its
state file lists exist. A folder without any state file holds the original's
checkpoints (or a classifier's, which are model and optimizer files only): there a
model file counts as complete, as it did for the original.
"""

import os
import re
import shutil

import torch

from . import atomic
from .checkpoints import CheckpointError, load_checkpoint_file
from .errors import usage

_MEMBER_STEM = r"(?:model|opt|state|ema_[^_]+_)\d+\.pt"  # the file names of a set's members
_MEMBER = re.compile(r"^(?:model|opt|state|ema_[^_]+_)(\d+)\.pt$")
_MODEL = re.compile(r"^model(\d+)\.pt$")
_STATE = re.compile(r"^state(\d+)\.pt$")


class CheckpointSaveError(RuntimeError):
    """A checkpoint set could not be written (full disk, quota, read-only folder); the previous
    sets are intact. The user's to fix (space, permissions, --log_dir): one error line, exit 2."""

    usage_error = True


def set_step(path):
    """The step digits of any file of a set (``model``/``ema_*``/``opt``/``state``), else None."""
    m = _MEMBER.match(os.path.basename(path))
    return m.group(1) if m else None


def model_path(folder, digits):
    return os.path.join(folder, f"model{digits}.pt")


def _listdir(folder):
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def _listed_files(folder, digits):
    """The files the state file of set ``digits`` names (none if it cannot be read: the load says why)."""
    try:
        state = load_checkpoint_file(os.path.join(folder, f"state{digits}.pt"))
    except CheckpointError:
        return []
    files = state.get("files") if isinstance(state, dict) else None
    return [str(name) for name in files or ()]


def missing_files(folder, digits, names=None):
    """The files of set ``digits`` absent from ``folder`` (``[]``: the set is complete)."""
    names = _listdir(folder) if names is None else names
    if not any(_STATE.match(n) for n in names):  # the original's checkpoints
        return [] if f"model{digits}.pt" in names else [f"model{digits}.pt"]
    wanted = [f"model{digits}.pt", f"opt{digits}.pt", f"state{digits}.pt"]
    if f"state{digits}.pt" in names:
        wanted += _listed_files(folder, digits)
    return [n for n in dict.fromkeys(wanted) if n not in names]


def _model_steps(names, newest_first=True):
    steps = {m.group(1) for m in map(_MODEL.match, names) if m}
    return sorted(steps, key=int, reverse=newest_first)


def complete_sets(folder, limit=None, exclude=()):
    """Step digits of the complete sets in ``folder``, newest first (at most ``limit``)."""
    names = _listdir(folder)
    found = []
    for digits in _model_steps(names):
        if digits not in exclude and not missing_files(folder, digits, names):
            found.append(digits)
            if limit and len(found) == limit:
                break
    return found


def find_latest(folder):
    """The model file of the newest complete set in ``folder``, or None."""
    found = complete_sets(folder, limit=1)
    return model_path(folder, found[0]) if found else None


def damaged_file(folder, digits):
    """``(path, error)`` of the first file of set ``digits`` that cannot be read, else None."""
    names = _listdir(folder)
    members = [n for n in sorted(names) if set_step(n) == digits]
    for name in sorted(members, key=lambda n: not n.startswith("model")):
        try:
            load_checkpoint_file(os.path.join(folder, name))
        except CheckpointError as err:
            return os.path.join(folder, name), err
    return None


def newest_intact(folder, exclude=()):
    """The model file of the newest complete set whose every file can be read, or None."""
    for digits in complete_sets(folder, exclude=exclude):
        if damaged_file(folder, digits) is None:
            return model_path(folder, digits)
    return None


def damaged_message(path, error):
    """One line for a set member that cannot be read: the file, why, and the newest intact set."""
    folder = os.path.dirname(os.path.abspath(path))
    intact = newest_intact(folder, exclude=(set_step(path),))
    fix = (f"the newest intact checkpoint set there is {intact}: resume from it with --resume_checkpoint {intact}"
           if intact else "no other intact checkpoint set is there")
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"checkpoint file {path} is damaged (truncated or corrupted: {reason}); {fix}"


def resolve(path, *, allow_partial=False):
    """The model file that ``--resume_checkpoint path`` names.

    A folder gives its newest complete set; any file of a set gives that set's model
    file. An incomplete set (an interrupted save) is refused with a usage error that
    names the newest complete one, unless ``allow_partial`` (the original's resume
    from whatever files are there).
    """
    if os.path.isdir(path):
        found = find_latest(path)
        if found is None:
            raise usage(FileNotFoundError(
                f"--resume_checkpoint {path!r} is a folder without a complete checkpoint set (model*.pt). "
                "Pass a checkpoint file or the log dir of an earlier run."
            ))
        return found
    digits = set_step(path)
    if digits is None:  # a file from elsewhere, e.g. a released model
        if not os.path.exists(path):
            raise usage(FileNotFoundError(f"--resume_checkpoint: model file {path!r} does not exist."))
        return path
    folder = os.path.dirname(path)
    model = model_path(folder, digits)

    def advice():  # read only for an error: it loads the folder's state files
        newest = find_latest(folder or ".")
        return f"The newest complete set there is {newest}." if newest else "There is no complete set there."

    if not os.path.exists(model):
        raise usage(FileNotFoundError(
            f"--resume_checkpoint: model file {model!r} does not exist. {advice()} Pass an existing "
            "model*.pt / ema_*.pt / opt*.pt / state*.pt file or a log dir."
        ))
    missing = [] if allow_partial else missing_files(folder or ".", digits)
    if missing:
        raise usage(FileNotFoundError(
            f"--resume_checkpoint: the checkpoint set of {model} is incomplete (no {', '.join(missing)}): "
            f"its save was interrupted. {advice()} Resume from that (or from the folder), or pass "
            "--allow_partial_resume True to load what there is and resume inexactly, as the original did."
        ))
    return model


def _nbytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def write_set(folder, name, *, model, emas, opt, state, on_event=None):
    """Write the set of step ``name`` into ``folder``: EMAs, optimizer, state, and the model file last.

    ``model`` and ``opt`` are state dicts, ``emas`` ``(rate, make_state_dict)`` pairs
    (each state dict is made just before it is written), ``state`` the state file's
    dict (or None: no state file), to which the list of the set's files is added.
    Returns the model file's path. A failed write raises `CheckpointSaveError` and
    leaves no file of the set behind; the earlier sets are untouched.
    """
    digits = f"{name:06d}"
    atomic.remove_temporaries(folder, _MEMBER_STEM)  # of saves killed before
    written = []

    def _member(file_name, obj):
        written.append(file_name)
        return os.path.join(folder, file_name), lambda f: atomic.torch_save_to(obj, f)

    def writes():
        for rate, make in emas:
            yield _member(f"ema_{rate}_{digits}.pt", make())
        yield _member(f"opt{digits}.pt", opt)
        if state is not None:
            yield _member(f"state{digits}.pt", dict(state, files=written + [f"state{digits}.pt"]))
        yield _member(f"model{digits}.pt", model)

    try:
        atomic.atomic_write_set(writes(), on_event=on_event)
    except OSError as err:
        size = _nbytes(model) * (1 + len(emas)) + _nbytes(opt) + _nbytes(state)
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MB free there"
        except OSError:
            free = "free space unknown"
        previous = find_latest(folder)
        kept = f"the previous set {previous} is intact" if previous else "no earlier set was there"
        raise CheckpointSaveError(
            f"cannot write checkpoint set {digits} in {folder}: {err.strerror or err}; the set needs about "
            f"{size / 2**20:.1f} MB ({free}). Nothing of it was kept and {kept}; training stopped. Free space "
            "or make the folder writable (or choose another --log_dir), then resume with "
            f"--resume_checkpoint {previous or folder}",
        ) from err
    return model_path(folder, digits)


def prune(folder, keep):
    """Delete the sets older than the ``keep`` newest complete ones (and older leftovers of killed
    saves); the model file of each goes first, so a set never looks complete while it is deleted.
    Returns the deleted file names."""
    kept = complete_sets(folder, limit=keep)
    if len(kept) < keep:
        return []
    oldest = int(kept[-1])
    doomed = [n for n in _listdir(folder) if set_step(n) is not None and int(set_step(n)) < oldest]
    doomed.sort(key=lambda n: (int(set_step(n)), not n.startswith("model"), n))
    for name in doomed:
        os.unlink(os.path.join(folder, name))
    return doomed
