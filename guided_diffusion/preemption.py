"""Stop training cleanly when the scheduler asks: a signal sets a flag, the loop saves and exits.

Clusters preempt jobs with a signal some time before they kill them (SLURM sends
SIGTERM, or the signal chosen with ``#SBATCH --signal=USR1@120`` that many seconds
before the time limit). `StopRequest` installs handlers that only record the
signal. The training loop asks `StopRequest.requested` at the end of every
iteration; that is collective (an all-reduce of the flag), so all ranks stop after
the same iteration even when only some of them received the signal. The loop then
writes a complete checkpoint set and raises `TrainingPreempted`, which ends the
process with `PREEMPTED_EXIT_STATUS`.
"""

import contextlib
import os
import signal
import threading
import warnings

from . import dist_util
from .errors import usage

# EX_TEMPFAIL of sysexits.h: a temporary failure, the command may be retried.
PREEMPTED_EXIT_STATUS = 75


class TrainingPreempted(SystemExit):
    """Raised once a preempted run's checkpoint set is written; ends the process with status 75."""

    def __init__(self, message):
        super().__init__(PREEMPTED_EXIT_STATUS)
        self.message = message

    def __str__(self):
        return self.message


def parse_signals(text):
    """``"TERM,USR1"`` (names with or without ``SIG``, or numbers) as signals; ``""``/``"none"``: none."""
    found = []
    for part in (p.strip() for p in str(text or "").split(",")):
        if not part or part.lower() == "none":
            continue
        name = part.upper() if part.upper().startswith("SIG") else "SIG" + part.upper()
        try:
            found.append(signal.Signals(int(part)) if part.isdigit() else signal.Signals[name])
        except (KeyError, ValueError):
            raise usage(ValueError(
                f"--save_on_signal: unknown signal {part!r}; give names such as TERM,USR1 (or none)"
            )) from None
    if signal.SIGKILL in found:
        raise usage(ValueError("--save_on_signal: SIGKILL cannot be caught; use TERM, USR1 or another signal"))
    return list(dict.fromkeys(found))


# The signals `StopRequest.deferred` blocks right now (None outside it): what a process forked
# meanwhile, such as a DataLoader worker, inherits blocked.
_deferring = None


def _serve_in_child():
    """In a process forked inside `StopRequest.deferred`: consume the blocked signals, and exit on a
    SIGTERM from the parent, the way torch stops its DataLoader workers (as torch's handler does)."""
    global _deferring
    if _deferring is None:
        return
    signals, parent = set(_deferring) | {signal.SIGTERM}, os.getppid()
    _deferring = None
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)

    def wait():
        while True:
            info = signal.sigwaitinfo(signals)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait, daemon=True, name="preemption-signals").start()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_serve_in_child)


class StopRequest:
    """The signals that ask training to stop; a context manager that installs their handlers.

    The handlers only record the first signal. Outside the main thread, where Python
    cannot install handlers, nothing is installed (a warning says so).
    """

    def __init__(self, signals=""):
        self.signals = parse_signals(signals)
        self.received = None  # the first signal this process got
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum)

    def __enter__(self):
        if self.signals and threading.current_thread() is not threading.main_thread():
            warnings.warn("save_on_signal needs the main thread; no signal handlers installed")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    @contextlib.contextmanager
    def deferred(self):
        """Hold the signals back from this thread while the block runs (they arrive right after).

        Run each training iteration inside it: DataLoader worker processes forked meanwhile
        inherit the block, so they survive a signal sent to the whole job (SLURM, mpiexec),
        of which torch's workers otherwise die, ending the run before it can save; a thread
        in each worker still lets the worker's parent end it with SIGTERM (`_serve_in_child`).
        """
        if not self._previous or not hasattr(signal, "pthread_sigmask"):
            yield
            return
        global _deferring
        signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        _deferring = self.signals
        try:
            yield
        finally:
            _deferring = None
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)

    def requested(self):
        """Whether any rank received one of the signals (collective when there are signals to watch)."""
        if not self.signals:
            return False
        return dist_util.any_rank(self.received is not None)

    def preempted(self, saved, folder):
        """The `TrainingPreempted` to raise after the set ``saved`` was written into ``folder``."""
        got = self.received.name if self.received is not None else "a signal on another rank"
        return TrainingPreempted(
            f"stopped on {got}: checkpoint set {saved or 'of rank 0'} written; exiting with status "
            f"{PREEMPTED_EXIT_STATUS}. Continue with --resume_checkpoint {folder} (or auto with the same --log_dir)"
        )
