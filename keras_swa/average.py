r"""Averages saved Keras models (`.keras` files) into a new `.keras` file.

The float variables of the files are averaged with
`keras_swa.average_checkpoints` (uniform mean, float32 or float64
accumulators, one file in memory at a time); the other variables (counters,
seeds) come from the last file. The architecture is that of the last file,
loaded with `compile=False`: the output holds the averaged model without
optimizer state or compile settings, ready for `keras.models.load_model`.
With no data at hand, the tool averages the BatchNormalization statistics
stored in the files and says so; recompute them with `keras_swa.update_bn`
after loading, on training data, for the exact statistics of the average.

Files are given as paths or glob patterns (quote them so that the tool, not
the shell, expands them); the matches of a pattern are sorted in natural
order (`ckpt/9.keras` before `ckpt/10.keras`), and the arguments are taken
in the order given. `--last=k` keeps the last k files: LAWA, "the average of
the last k checkpoints".

Examples:
  python -m keras_swa.average --output=avg.keras 'ckpt/*.keras'
  python -m keras_swa.average --output=avg.keras --last=5 'ckpt/*.keras'
"""

import glob
import os
import re
import shutil
import sys
import tempfile
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402

from keras_swa import batch_norm  # noqa: E402
from keras_swa import checkpoints  # noqa: E402

_PROGRAM = "keras_swa.average"

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "output", None, "The `.keras` file to write the averaged model to."
)
flags.DEFINE_integer(
    "last",
    None,
    "Average only the last k of the files (all of them by default).",
    lower_bound=1,
)
flags.DEFINE_bool(
    "overwrite", False, "Replace --output if it exists already."
)
flags.mark_flag_as_required("output")
flags.register_validator(
    "output",
    lambda path: path is None or path.endswith(".keras"),
    message="--output must be a path ending in `.keras`.",
)


class _Error(Exception):
    """A bad argument or input file: one line for the user, no traceback."""


def _natural_key(path):
    # Digit runs compare as numbers: epoch 9 before epoch 10.
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", path)
    ]


def expand(arguments):
    """The files named by `arguments` (paths or glob patterns), in order."""
    if not arguments:
        raise _Error(
            "no input files: give `.keras` files or glob patterns after the "
            "flags, e.g. 'ckpt/*.keras'."
        )
    files = []
    for argument in arguments:
        if glob.has_magic(argument):
            matches = sorted(glob.glob(argument), key=_natural_key)
            if not matches:
                raise _Error(f"no file matches {argument!r}.")
        else:
            matches = [argument]
        for path in matches:
            if not path.endswith(".keras"):
                raise _Error(
                    f"{path!r} is not a `.keras` file; the tool averages "
                    "files saved by `model.save(...keras)`."
                )
            if not os.path.isfile(path):
                raise _Error(f"{path!r} does not exist or is not a file.")
            if path in files:
                raise _Error(f"{path!r} is given twice.")
            files.append(path)
    return files


def _check_output(output, files, overwrite):
    if any(os.path.abspath(output) == os.path.abspath(f) for f in files):
        raise _Error(f"--output={output} is one of the input files.")
    if os.path.exists(output) and not overwrite:
        raise _Error(
            f"--output={output} exists already; pass --overwrite to replace it."
        )


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


def average(arguments, output, last=None, overwrite=False, out=sys.stdout):
    """Averages the files named by `arguments` into `output`.

    Raises `_Error` with a one-line message on bad input.
    """
    found = expand(arguments)
    files = found[-last:] if last is not None else found
    _check_output(output, files, overwrite)
    try:
        model = keras.models.load_model(files[-1], compile=False)
    except Exception as error:
        raise _Error(f"cannot load {files[-1]!r}: {error}") from None
    selection = f"the last {len(files)} of {len(found)}" if last else "all"
    print(
        f"Averaging {selection} files (uniform mean of their float "
        "variables; the others from the last file):",
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
            checkpoints.average_checkpoints(model, files)
        except ValueError as error:
            raise _Error(str(error)) from None
    if batch_norm._batch_norm_layers(model):
        print(
            "BatchNormalization statistics: AVERAGED from the files, not "
            "recomputed (this tool has no data). For exact statistics, load "
            "the output and run keras_swa.update_bn(model, train_data).",
            file=out,
        )
    _save_atomically(model, output)
    print(f"Wrote {output}", file=out)


def parse_flags(argv):
    """Parses the flags; a bad flag ends the program with one line."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"{_PROGRAM}: error: {error}")


def main(argv):
    try:
        average(argv[1:], FLAGS.output, FLAGS.last, FLAGS.overwrite)
    except _Error as error:
        sys.exit(f"{_PROGRAM}: error: {error}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
