"""Experiment logging with the API of OpenAI's ``logger`` module.

Two kinds of records go through a logger:

* free text, ``log("step", 3)``, written to the "sequence" outputs
  (stdout, ``log.txt``);
* key/value diagnostics, ``logkv`` / ``logkv_mean`` accumulated until
  ``dumpkvs()``, written as one row to every "key/value" output
  (stdout and ``log.txt`` as a table, ``progress.csv``, ``progress.json``,
  TensorBoard).

Configuration follows the original:

* ``configure(dir=None)`` logs to ``$OPENAI_LOGDIR``, else to a fresh folder
  in the system temp dir; the absolute folder is logged at start.
* ``format_strs=None`` reads ``$OPENAI_LOG_FORMAT`` (default
  ``stdout,log,csv``) on rank 0 and ``$OPENAI_LOG_FORMAT_MPI`` (default
  ``log``) on other ranks; files of rank ``r > 0`` get the suffix
  ``-rank{r:03d}`` (``log-rank001.txt``).

With several processes, ``dumpkvs`` is a collective call: every rank must call
it. Values logged with ``logkv_mean`` are then averaged over ranks, weighted by
how many values each rank logged; values set with ``logkv`` keep rank 0's value.
The reduction uses the mpi4py communicator given as ``comm``, else
``torch.distributed`` when it is initialised with more than one process; a
single plain process needs neither.
"""

import contextlib
import csv
import datetime
import functools
import json
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict

from . import dist_util

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50

FORMATS = ("stdout", "log", "csv", "json", "tensorboard")


# ----------------------------------------------------------------------------- values


def _plain(value):
    """Return a python scalar for 0-d numpy arrays / tensors; anything else unchanged."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(text, width=30):
    return text if len(text) <= width else text[: width - 3] + "..."


# ----------------------------------------------------------------------------- output formats


class KVWriter:
    """An output that takes key/value rows (``Logger.dumpkvs``)."""

    def writekvs(self, kvs):
        raise NotImplementedError


class SeqWriter:
    """An output that takes free-text lines (``Logger.log``)."""

    def writeseq(self, seq):
        raise NotImplementedError


class TextOutput(KVWriter, SeqWriter):
    """Human-readable output: text lines and key/value tables.

    ``filename_or_file`` is a file name (appended to), an open text file (written
    to, not closed), or None for stdout.
    """

    def __init__(self, filename_or_file=None):
        self._owned = isinstance(filename_or_file, (str, os.PathLike))
        if self._owned:
            self._file = open(filename_or_file, "a", encoding="utf-8")
        else:
            self._file = filename_or_file

    @property
    def file(self):
        """The log file, or for stdout output whatever ``sys.stdout`` is now (so that
        redirections and test captures made after ``configure`` are honoured)."""
        return sys.stdout if self._file is None else self._file

    def writekvs(self, kvs):
        if not kvs:
            warnings.warn("logger.dumpkvs() called with no values logged since the last dump")
            return
        cells = []
        for key in sorted(kvs, key=str.lower):
            value = _plain(kvs[key])
            text = f"{value:<8.3g}" if isinstance(value, float) else str(value)
            cells.append((_short(key), _short(text)))
        key_w = max(len(k) for k, _ in cells)
        val_w = max(len(v) for _, v in cells)
        rule = "-" * (key_w + val_w + 7)
        rows = [f"| {k.ljust(key_w)} | {v.ljust(val_w)} |" for k, v in cells]
        self.file.write("\n".join([rule, *rows, rule]) + "\n")
        self.file.flush()

    def writeseq(self, seq):
        self.file.write(" ".join(str(item) for item in seq) + "\n")
        self.file.flush()

    def close(self):
        if self._owned:
            self._file.close()


class CSVOutput(KVWriter):
    """``progress.csv``: one row per dump; a new key adds a column, rewriting the
    header and padding the earlier rows with empty cells. Cells holding commas,
    quotes or newlines are quoted (CSV rules); other cells are ``str(value)``."""

    def __init__(self, filename):
        self.file = open(filename, "w+", encoding="utf-8", newline="")
        self.keys = []

    def _writerows(self, rows):
        csv.writer(self.file, lineterminator="\n").writerows(rows)

    def writekvs(self, kvs):
        new_keys = sorted(set(kvs) - set(self.keys))
        if new_keys:
            self.keys.extend(new_keys)
            self.file.seek(0)
            old_rows = list(csv.reader(self.file))[1:]
            self.file.seek(0)
            self.file.truncate()
            self._writerows([self.keys] + [row + [""] * len(new_keys) for row in old_rows])
        self._writerows([["" if key not in kvs else str(_plain(kvs[key])) for key in self.keys]])
        self.file.flush()

    def close(self):
        self.file.close()


class JSONOutput(KVWriter):
    """``progress.json``: one JSON object per dump (JSON lines)."""

    def __init__(self, filename):
        self.file = open(filename, "w", encoding="utf-8")

    def writekvs(self, kvs):
        row = {key: _plain(value) for key, value in kvs.items()}
        self.file.write(json.dumps(row, default=str) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class TensorBoardOutput(KVWriter):
    """TensorBoard event files (needs the ``tensorboard`` package); one step per dump."""

    def __init__(self, dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "logger format 'tensorboard' needs the tensorboard package, which is not installed "
                f"({err}). Install it with `pip install tensorboard`, or drop 'tensorboard' from "
                "format_strs / $OPENAI_LOG_FORMAT."
            ) from err
        self.writer = SummaryWriter(log_dir=dir)
        self.step = 0

    def writekvs(self, kvs):
        for key, value in kvs.items():
            value = _plain(value)
            if _is_number(value):
                self.writer.add_scalar(key, value, self.step)
        self.writer.flush()
        self.step += 1

    def close(self):
        self.writer.close()


# The original's names for the outputs.
HumanOutputFormat = TextOutput
CSVOutputFormat = CSVOutput
JSONOutputFormat = JSONOutput
TensorBoardOutputFormat = TensorBoardOutput


def make_output_format(format, ev_dir, log_suffix=""):
    """Build the output called ``format`` writing into ``ev_dir``."""
    os.makedirs(ev_dir, exist_ok=True)
    if format == "stdout":
        return TextOutput()
    if format == "log":
        return TextOutput(os.path.join(ev_dir, f"log{log_suffix}.txt"))
    if format == "csv":
        return CSVOutput(os.path.join(ev_dir, f"progress{log_suffix}.csv"))
    if format == "json":
        return JSONOutput(os.path.join(ev_dir, f"progress{log_suffix}.json"))
    if format == "tensorboard":
        return TensorBoardOutput(os.path.join(ev_dir, f"tb{log_suffix}"))
    raise ValueError(
        f"unknown logger format {format!r}; choose from {', '.join(FORMATS)} "
        "(in format_strs or the comma-separated $OPENAI_LOG_FORMAT)"
    )


# ----------------------------------------------------------------------------- cross-rank reduction


def weighted_mean(gathered):
    """Combine the ``{key: (value, count)}`` dicts of all ranks (rank 0 first).

    Keys with a count (from ``logkv_mean``) become the count-weighted mean over
    the ranks that logged them; other keys keep the first rank's value that has
    them (rank 0's, when it logged the key).
    """
    result, sums, counts = {}, defaultdict(float), defaultdict(int)
    for rank_values in gathered:
        for key, (value, count) in rank_values.items():
            if count and _is_number(value):
                sums[key] += value * count
                counts[key] += count
            else:
                result.setdefault(key, value)
    for key, total in counts.items():
        result[key] = sums[key] / total
    return result


def mpi_weighted_mean(comm, local_name2valcount):
    """Count-weighted means of ``{name: (value, count)}`` over the ranks of the mpi4py
    communicator ``comm``: the result on rank 0, ``{}`` on the others."""
    gathered = comm.gather(local_name2valcount)
    return weighted_mean(gathered) if comm.Get_rank() == 0 else {}


def _gather(comm, obj):
    """Return the list of ``obj`` from every rank, on every rank (None when alone)."""
    if comm is not None:
        return comm.allgather(obj) if comm.Get_size() > 1 else None
    if dist_util.get_world_size() == 1:
        return None
    return dist_util.all_gather_objects(obj)


# ----------------------------------------------------------------------------- the logger


class Logger:
    """Accumulates key/values between dumps and writes to a list of outputs."""

    # The logger in use, and the one made on first use without configure().
    CURRENT = None
    DEFAULT = None

    def __init__(self, dir, output_formats, comm=None):
        self.name2val = {}
        self.name2cnt = defaultdict(int)  # number of logkv_mean values per key
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm

    def logkv(self, key, val):
        self.name2val[key] = val
        self.name2cnt.pop(key, None)

    def logkv_mean(self, key, val):
        count = self.name2cnt[key]
        old = self.name2val.get(key, 0.0)
        self.name2val[key] = old * count / (count + 1) + val / (count + 1)
        self.name2cnt[key] = count + 1

    def dumpkvs(self):
        local = {key: (_plain(val), self.name2cnt.get(key, 0)) for key, val in self.name2val.items()}
        gathered = _gather(self.comm, local)
        values = dict(self.name2val) if gathered is None else weighted_mean(gathered)
        for fmt in self.output_formats:
            if hasattr(fmt, "writekvs"):
                fmt.writekvs(values)
        self.name2val.clear()
        self.name2cnt.clear()
        return dict(values)

    def log(self, *args, level=INFO):
        if self.level <= level:
            for fmt in self.output_formats:
                if hasattr(fmt, "writeseq"):
                    fmt.writeseq(args)

    def set_level(self, level):
        self.level = level

    def set_comm(self, comm):
        self.comm = comm

    def get_dir(self):
        return self.dir

    def close(self):
        for fmt in self.output_formats:
            fmt.close()


def get_current():
    """The logger in use; a default one (``configure()``) is made on first use."""
    if Logger.CURRENT is None:
        configure()
        Logger.DEFAULT = Logger.CURRENT
    return Logger.CURRENT


# ----------------------------------------------------------------------------- module API


def logkv(key, val):
    """Set the diagnostic ``key`` to ``val`` for this dump (the last call wins)."""
    get_current().logkv(key, val)


def logkv_mean(key, val):
    """Average ``val`` into ``key`` over the calls of this dump (and over ranks)."""
    get_current().logkv_mean(key, val)


def logkvs(d):
    """``logkv`` for every item of the dict ``d``."""
    for key, val in d.items():
        logkv(key, val)


def dumpkvs():
    """Write the diagnostics of this step to every output, clear them and return them."""
    return get_current().dumpkvs()


def getkvs():
    """The diagnostics logged since the last dump (the live dict)."""
    return get_current().name2val


def log(*args, level=INFO):
    """Write ``args`` separated by spaces to stdout / log.txt when ``level`` is enabled."""
    get_current().log(*args, level=level)


def debug(*args):
    log(*args, level=DEBUG)


def info(*args):
    log(*args, level=INFO)


def warn(*args):
    log(*args, level=WARN)


def error(*args):
    log(*args, level=ERROR)


def set_level(level):
    """Only messages at ``level`` or above are written (DEBUG, INFO, WARN, ERROR, DISABLED)."""
    get_current().set_level(level)


def set_comm(comm):
    get_current().set_comm(comm)


def get_dir():
    """The folder the current logger writes to."""
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


@contextlib.contextmanager
def profile_kv(scopename):
    """Add the seconds spent inside the ``with`` block to the diagnostic ``wait_{scopename}``."""
    key = "wait_" + scopename
    start = time.perf_counter()
    try:
        yield
    finally:
        values = get_current().name2val
        values[key] = values.get(key, 0.0) + time.perf_counter() - start


def profile(n):
    """Decorator: time every call of the function under ``profile_kv(n)``."""

    def decorate(func):
        @functools.wraps(func)
        def timed(*args, **kwargs):
            with profile_kv(n):
                return func(*args, **kwargs)

        return timed

    return decorate


def get_rank_without_mpi_import():
    """This process's rank: torch.distributed's when initialised, else the launcher's
    environment (torchrun ``RANK``, mpich/Intel ``PMI_RANK``, Open MPI
    ``OMPI_COMM_WORLD_RANK``), else 0 (`dist_util.rank_and_world`). Never imports mpi4py."""
    return dist_util.rank_and_world()[0]


def _fresh_log_dir():
    stamp = datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f-")
    return tempfile.mkdtemp(prefix=stamp)


def configure(dir=None, format_strs=None, comm=None, log_suffix=""):
    """Make a new current logger writing to ``dir`` in the formats ``format_strs``.

    ``dir`` defaults to ``$OPENAI_LOGDIR``, else a fresh folder in the temp dir.
    ``format_strs`` defaults to ``$OPENAI_LOG_FORMAT`` (``stdout,log,csv``) on
    rank 0 and ``$OPENAI_LOG_FORMAT_MPI`` (``log``) on other ranks, whose file
    names also get ``-rank{r:03d}``. ``comm`` is an optional mpi4py communicator
    for averaging across ranks (torch.distributed is used when it is None).
    """
    if dir is None:
        dir = os.getenv("OPENAI_LOGDIR") or _fresh_log_dir()
    dir = os.path.expanduser(dir)
    if not os.path.isabs(dir):
        dir = os.path.abspath(dir)
    os.makedirs(dir, exist_ok=True)

    rank = get_rank_without_mpi_import()
    if rank > 0:
        log_suffix = f"{log_suffix}-rank{rank:03d}"
    if format_strs is None:
        if rank == 0:
            format_strs = os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",")
        else:
            format_strs = os.getenv("OPENAI_LOG_FORMAT_MPI", "log").split(",")
    formats = [make_output_format(f.strip(), dir, log_suffix) for f in format_strs if f.strip()]

    Logger.CURRENT = Logger(dir=dir, output_formats=formats, comm=comm)
    if formats:
        log(f"Logging to {dir}")


def reset():
    """Close the current logger and go back to the default one."""
    if Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
        Logger.CURRENT = Logger.DEFAULT
        log("Reset logger")


@contextlib.contextmanager
def scoped_configure(dir=None, format_strs=None, comm=None):
    """Log with a temporary configuration inside a ``with`` block, then restore the previous logger."""
    previous = Logger.CURRENT
    configure(dir=dir, format_strs=format_strs, comm=comm)
    try:
        yield
    finally:
        Logger.CURRENT.close()
        Logger.CURRENT = previous
