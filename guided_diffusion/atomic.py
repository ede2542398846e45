"""Atomic file writes: a crash leaves the old file or the new one under the final name, never a
partial file.

Every writer here goes through `atomic_write`: the bytes go to a temporary file in
the destination's folder (so the final rename never crosses file systems), which is
flushed and fsynced, renamed over the destination with ``os.replace`` and the folder
fsynced, so the rename itself survives a power loss. On any failure the temporary
file is removed and the destination is untouched. Remote paths (``scheme://...``)
are written with ``blobfile``: object stores publish an object only when it is
closed, which gives the same guarantee.

`atomic_write_set` extends this to several files that belong together: the last of
them (the one a reader looks for) appears only after all the others are in place.
"""

import os
import re
import tempfile

import numpy as np
import torch


def _is_remote(path):
    return "://" in path


def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is atomic all the same
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Call ``write(fileobj)`` on a binary file that replaces ``path`` only once ``write`` returned."""
    path = os.fspath(path)
    if _is_remote(path):
        import blobfile

        with blobfile.BlobFile(path, "wb") as f:
            write(f)
        return
    tmp = _write_temporary(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def _write_temporary(path, write):
    """The name of a temporary file beside ``path`` holding what ``write(fileobj)`` wrote, fsynced;
    nothing is left behind if ``write`` fails."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def remove_temporaries(folder, destinations):
    """Remove from ``folder`` the temporary files that killed atomic writes of files whose names
    match the regular expression ``destinations`` left behind."""
    pattern = re.compile(rf"^\.(?:{destinations})\..+\.tmp$")
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if pattern.match(name):
            _remove_quietly(os.path.join(folder, name))


def _remove_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write_set(writes, on_event=None):
    """Write the files of ``writes`` so that the last one appears only once all the others are in place.

    ``writes`` is an iterable of ``(path, write)`` pairs, ``write(fileobj)`` as for `atomic_write`,
    all in one folder. Each file goes to a temporary file that is fsynced; only when every one
    succeeded are they renamed into place in order, the last one last, and the folder is fsynced.
    A reader that finds the last file therefore finds the others complete, whenever the process
    is killed; an existing last file is removed before the renames, so it is never seen beside
    files of another version. If a write fails, every temporary file is removed and no destination
    is touched. ``on_event(path, stage)`` is called after each temporary file is written
    (``"written"``) and after each rename (``"renamed"``).
    """
    on_event = on_event or (lambda path, stage: None)
    done, folders = [], set()  # done: (temporary, destination) not yet renamed
    try:
        for path, write in writes:
            path = os.fspath(path)
            if _is_remote(path):  # object stores publish on close: write in order, the last one last
                atomic_write(path, write)
                on_event(path, "renamed")
                continue
            done.append((_write_temporary(path, write), path))
            folders.add(os.path.dirname(os.path.abspath(path)))
            on_event(path, "written")
        if done:
            _remove_quietly(done[-1][1])
        while done:
            tmp, path = done[0]
            os.replace(tmp, path)
            done.pop(0)
            on_event(path, "renamed")
    except BaseException:
        for tmp, _ in done:
            _remove_quietly(tmp)
        raise
    for folder in folders:
        _fsync_folder(folder)


class _Recording:
    """A file object that keeps the `OSError` of a failed write (torch.save turns it into a RuntimeError)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self):
        return self.f.flush()


def torch_save_to(obj, f):
    """``torch.save(obj, f)``; a failed write (ENOSPC, EDQUOT, EFBIG) raises its `OSError`, which
    torch's zip writer would report as an unexplained RuntimeError."""
    recording = _Recording(f)
    try:
        torch.save(obj, recording)
    except RuntimeError:
        if recording.error is None:
            raise
        raise recording.error from None


def atomic_save(obj, path):
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text):
    """Write ``text`` (UTF-8) to ``path``, atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_savez(path, **arrays):
    """``np.savez(path, **arrays)``, atomically; arrays of Python objects are refused.

    Object arrays would be pickled, and a pickle runs code when it is loaded, so
    the file could not be read with ``np.load(allow_pickle=False)``.
    """
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    pickled = sorted(name for name, value in arrays.items() if value.dtype.hasobject)
    if pickled:
        raise TypeError(
            f"cannot save {', '.join(pickled)} to {os.fspath(path)}: arrays of Python objects would be "
            "pickled. Convert them to numeric or string arrays first."
        )
    atomic_write(path, lambda f: np.savez(f, **arrays))
