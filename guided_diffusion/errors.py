"""Errors caused by what the user typed, and how the command-line tools report them.

A flag, path or input file that cannot work raises an exception whose message names
the problem and the fix. Inside the library it keeps the type the original raised
(or the built-in one a caller expects: ``ValueError``, ``FileNotFoundError``,
``NotImplementedError``), so ``except`` clauses written against the original still
catch it; :func:`usage` only marks it. The scripts' own checks raise
:class:`UsageError`, and a checkpoint that cannot be read or does not fit the flags
raises ``checkpoints.CheckpointError``; both classes carry the mark. The scripts run
their ``main`` through :func:`run_main`, which prints a marked error as one
``prog: error: ...`` line and exits with status 2, as argparse does for a bad flag.
Anything else is a bug or a failure of the machine and keeps its traceback.
"""

import os
import sys


class UsageError(ValueError):
    """A flag or input the user gave cannot work; the message says how to fix it."""

    usage_error = True


def usage(error):
    """Mark ``error`` as caused by a flag or input of the user and return it.

    ``raise usage(ValueError("--batch_size must be positive; ..."))``: the exception
    keeps its type and message; only :func:`run_main` reads the mark.
    """
    error.usage_error = True
    return error


def is_usage_error(error):
    """Whether ``error`` is the user's to fix: marked by :func:`usage`, or of a class that
    says so (:class:`UsageError`, ``checkpoints.CheckpointError``)."""
    return getattr(error, "usage_error", False) is True


def run_main(main, argv=None):
    """Run a script's ``main(argv)``; print a usage error as one line and exit 2."""
    try:
        main(argv)
    except Exception as err:
        if not is_usage_error(err):
            raise
        prog = os.path.basename(sys.argv[0]) or "guided_diffusion"
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
