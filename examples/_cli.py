"""Command-line plumbing shared by the example binaries.

A bad flag, missing data or an unwritable output path ends a binary with one
line on stderr (`<binary>: error: <what is wrong and what to do>`) and exit
status 2, before any training or timing, and without importing Keras (whose
start-up takes seconds and writes its own lines to stderr). Errors of the
program itself still end with a traceback.
"""

import os
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging

USAGE_EXIT_CODE = 2


class UsageError(ValueError):
    """A mistake of the user (flag, data, path), told in one line."""


def one_line(text):
    """`text` with its whitespace runs, newlines included, collapsed."""
    return " ".join(str(text).split())


def fail(prog, message):
    """Writes `prog: error: message` as one line to stderr; exits with 2."""
    sys.stderr.write(f"{prog}: error: {one_line(message)}\n")
    sys.stderr.flush()
    sys.exit(USAGE_EXIT_CODE)


def run(main, prog):
    """`absl.app.run(main)`, with flag errors and `UsageError`s of `main`
    told in one line (absl would print the whole help before the reason)."""

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            reason = one_line(e).replace(" ?", "?").rstrip(".")
            end = "" if reason.endswith("?") else "."
            fail(prog, f"{reason}{end} `python -m {prog} --helpshort` lists the flags.")

    def checked_main(argv):
        if not flags.FLAGS["verbosity"].present:
            # absl's default under `app.run` is INFO, which lets libraries
            # (tensorflow-datasets) log every lookup to stderr.
            logging.set_verbosity(logging.WARNING)
        if len(argv) > 1:
            fail(
                prog,
                f"unexpected arguments {' '.join(argv[1:])!r}: flags are "
                f"written --name=value. `python -m {prog} --helpshort` lists "
                "them.",
            )
        try:
            return main(argv)
        except UsageError as e:
            fail(prog, str(e))

    app.run(checked_main, flags_parser=parse)


def check_output_dir(path, flag="output_dir"):
    """Creates the folder `path` if needed and checks that a file can be
    written there; raises `UsageError` naming `--flag` otherwise."""
    if not path:
        raise UsageError(f"--{flag} must not be empty.")
    path = os.path.expanduser(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(
            f"--{flag}={path} cannot be created or written "
            f"({e.strerror or e}): pass a folder you can write to."
        ) from None
    return path


def check_output_file(path, flag="output"):
    """Checks that the file `path` can be written (its folder is created if
    needed), without creating the file; raises `UsageError` naming `--flag`."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        raise UsageError(f"--{flag}={path} is a folder: pass a file name.")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        check_output_dir(folder, flag)
    except UsageError:
        raise UsageError(
            f"--{flag}={path}: its folder {folder} cannot be created or "
            f"written; pass a file in a folder you can write to."
        ) from None
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(
            f"--{flag}={path} exists and cannot be written: pass another file."
        )
    return path
