r"""Averages saved Keras models into a new `.keras` file.

The float variables of the files are averaged with
`keras_swa.average_checkpoints` (uniform mean, float32 or float64
accumulators, one file in memory at a time); the other variables (counters,
seeds) come from the last file. The files are `.keras` files (`model.save`)
or `.weights.h5` files (`model.save_weights`); the architecture is that of
`--model=ARCH.keras`, or else of the last `.keras` file among them, loaded
with `compile=False`: the output holds the averaged model without optimizer
state or compile settings, ready for `keras.models.load_model`. With no data
at hand, the tool averages the BatchNormalization statistics stored in the
files and says so; recompute them with `keras_swa.update_bn` after loading,
on training data, for the exact statistics of the average.

Files are given as paths or glob patterns (quote them so that the tool, not
the shell, expands them); the matches of a pattern are sorted in natural
order (`ckpt/9.keras` before `ckpt/10.keras`), and the arguments are taken
in the order given. `--last=k` keeps the last k files: LAWA, "the average of
the last k checkpoints".

Every flag, path (the inputs, `--model`, the directory of `--output`) and
the layout of every file are checked before Keras is imported
(`keras_swa._average_args`): a mistake ends the tool at once with a usage
line, one line naming it, and exit status 2. A failure during the work (a
file holding NaN) ends it with one line and exit status 1, and writes
nothing.

Examples:
  python -m keras_swa.average --output=avg.keras 'ckpt/*.keras'
  python -m keras_swa.average --output=avg.keras --last=5 'ckpt/*.keras'
  python -m keras_swa.average --output=avg.keras --model=model.keras \
      'ckpt/*.weights.h5'
"""

import os
import shutil
import sys
import tempfile
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_swa import _average_args  # noqa: E402

# The package's import checked the arguments already when run as
# `python -m keras_swa.average`; Keras is imported only now.
import keras  # noqa: E402

from keras_swa import batch_norm  # noqa: E402
from keras_swa import checkpoints  # noqa: E402


class _Error(Exception):
    """A failure during the work: one line for the user, no traceback."""


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _save_atomically(model, output):
    # A failed or interrupted save leaves no half-written output behind.
    directory = tempfile.mkdtemp(
        dir=os.path.dirname(os.path.abspath(output)), prefix=".average_"
    )
    try:
        partial = os.path.join(directory, "model.keras")
        model.save(partial)
        os.replace(partial, output)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def average(plan: _average_args.Plan, out=sys.stdout) -> None:
    """Averages the files of a checked `plan` into its output.

    Args:
        plan: What to average and where, from `_average_args.plan`.
        out: The stream for the tool's report. Defaults to `sys.stdout`.

    Raises:
        _Error: with a one-line message when a file cannot be loaded or
            averaged; nothing is written then.
    """
    try:
        model = keras.models.load_model(plan.architecture, compile=False)
    except Exception as error:
        raise _Error(
            f"cannot load {plan.architecture!r}: {_first_line(error)}"
        ) from None
    files = list(plan.files)
    selection = (
        f"the last {len(files)} of {plan.found}"
        if len(files) < plan.found else "all"
    )
    print(
        f"Averaging {selection} files (uniform mean of their float "
        "variables; the others from the last file), with the architecture "
        f"of {plan.architecture}:",
        file=out,
    )
    for path in files:
        print(f"  {path}", file=out)
    with warnings.catch_warnings():
        # Said below in plain words.
        warnings.filterwarnings(
            "ignore", message=".*averaged the BatchNormalization statistics"
        )
        try:
            checkpoints.average_checkpoints(model, files, verbose=0)
        except ValueError as error:
            raise _Error(_first_line(error)) from None
    if batch_norm._batch_norm_layers(model):
        print(
            "BatchNormalization statistics: AVERAGED from the files, not "
            "recomputed (this tool has no data). For exact statistics, load "
            "the output and run keras_swa.update_bn(model, train_data).",
            file=out,
        )
    try:
        _save_atomically(model, plan.output)
    except OSError as error:
        raise _Error(f"cannot write {plan.output!r}: {error}") from None
    print(f"Wrote {plan.output}", file=out)


def main(argv=None) -> None:
    """Runs the tool on `argv` (the command-line arguments by default)."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    plan = _average_args.checked_plan(arguments)
    try:
        average(plan)
    except _Error as error:
        sys.exit(f"{_average_args.PROGRAM}: error: {error}")


if __name__ == "__main__":
    main()
