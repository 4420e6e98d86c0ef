"""The arguments and files of `python -m keras_swa.average`, before Keras.

Importing Keras and a backend takes seconds. `python -m keras_swa.average`
imports the package `keras_swa` before the tool runs, so the package calls
`check_before_import()` first: for that command only, the flags, every path
and the layout of every file's weights are checked here (standard library and
h5py, no Keras), and a mistake or `--help` answers at once. A mistake ends
the program with a usage line, one line naming it, and exit status 2.
"""

import argparse
import dataclasses
import glob
import io
import os
import re
import struct
import sys
import zipfile

PROGRAM = "python -m keras_swa.average"
_MODULE = "keras_swa.average"

_USAGE = (
    f"{PROGRAM} [-h] --output=OUT.keras [--last=K] [--model=ARCH.keras] "
    "[--overwrite] FILE [FILE ...]"
)

_DESCRIPTION = """\
Averages saved Keras models into a new `.keras` file: the uniform mean of
their float variables (float32 accumulators; float64 for float64), the other
variables (counters, seeds) from the last file. FILE is a `.keras` file
(`model.save`) or a `.weights.h5` file (`model.save_weights`,
`ModelCheckpoint(save_weights_only=True)`), or a quoted glob pattern, whose
matches are taken in natural order (9 before 10). The architecture is that
of --model, or else of the last `.keras` file among the inputs, loaded with
compile=False: the output has no optimizer state or compile settings. The
BatchNormalization statistics are averaged, not recomputed (the tool has no
data); run keras_swa.update_bn on the loaded output for exact ones. Every
flag, path and file layout is checked before Keras is imported."""

_EPILOG = f"""\
examples:
  {PROGRAM} --output=avg.keras 'ckpt/*.keras'
  {PROGRAM} --output=avg.keras --last=5 'ckpt/*.keras'
  {PROGRAM} --output=avg.keras --model=model.keras 'ckpt/*.weights.h5'"""

# The member of a `.keras` archive that holds the weights, and the group of
# a weights file that holds the optimizer's state (never averaged).
_WEIGHTS_MEMBER = "model.weights.h5"
_OPTIMIZER_GROUP = "optimizer"

_FLOAT_DTYPES = ("float16", "float32", "float64", "bfloat16")


class UsageError(Exception):
    """A bad argument or input file, found before any work: one line."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the tool does, once every argument and file is checked.

    Attributes:
        files: The files to average, in order.
        found: How many files the arguments named before `--last`.
        architecture: The `.keras` file the model is loaded from.
        output: The `.keras` file to write.
    """

    files: tuple
    found: int
    architecture: str
    output: str


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be an integer >= 1, got {text!r}"
        )
    return value


def parser() -> argparse.ArgumentParser:
    """The tool's argument parser (its errors exit with status 2)."""
    result = argparse.ArgumentParser(
        prog=PROGRAM,
        usage=_USAGE,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    result.add_argument(
        "files", nargs="*", metavar="FILE",
        help="`.keras` or `.weights.h5` files or quoted glob patterns.",
    )
    result.add_argument(
        "--output", required=True, metavar="OUT.keras",
        help="The `.keras` file to write; its directory must exist.",
    )
    result.add_argument(
        "--last", type=_positive, metavar="K",
        help="Average only the last K files (all of them by default).",
    )
    result.add_argument(
        "--model", metavar="ARCH.keras",
        help="A `.keras` file that gives the architecture (needed for "
        "`.weights.h5` inputs without a `.keras` one); its weights are "
        "averaged only if it is also a FILE.",
    )
    result.add_argument(
        "--overwrite", action="store_true",
        help="Replace --output if it exists.",
    )
    return result


def _natural_key(path):
    # Digit runs compare as numbers: epoch 9 before epoch 10.
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", path)
    ]


def _check_readable(path, what):
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path!r} does not exist or is not a file.")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path!r} is not readable.")


def expand(arguments) -> list:
    """The files named by `arguments` (paths or glob patterns), in order."""
    if not arguments:
        raise UsageError(
            "no input files: give `.keras` or `.weights.h5` files or quoted "
            "glob patterns, e.g. 'ckpt/*.keras'."
        )
    files = []
    for argument in arguments:
        if glob.has_magic(argument):
            matches = sorted(glob.glob(argument), key=_natural_key)
            if not matches:
                raise UsageError(f"no file matches {argument!r}.")
        else:
            matches = [argument]
        for path in matches:
            if not path.endswith((".keras", ".weights.h5")):
                raise UsageError(
                    f"{path!r} is neither a `.keras` nor a `.weights.h5` "
                    "file (as written by `model.save` and "
                    "`model.save_weights`)."
                )
            _check_readable(path, "input")
            if path in files:
                raise UsageError(f"{path!r} is given twice.")
            files.append(path)
    return files


def _architecture(files, model):
    if model is not None:
        if not model.endswith(".keras"):
            raise UsageError(
                f"--model={model} must be a `.keras` file (`model.save`)."
            )
        _check_readable(model, "--model")
        return model
    models = [path for path in files if path.endswith(".keras")]
    if not models:
        raise UsageError(
            "`.weights.h5` files hold weights but no architecture: give "
            "--model=ARCH.keras, a model of that architecture saved with "
            "`model.save`."
        )
    return models[-1]


def _check_output(output, files, architecture, overwrite):
    if not output.endswith(".keras"):
        raise UsageError(f"--output={output} must end in `.keras`.")
    absolute = os.path.abspath(output)
    if any(absolute == os.path.abspath(p) for p in (*files, architecture)):
        raise UsageError(f"--output={output} is one of the input files.")
    directory = os.path.dirname(absolute)
    if not os.path.isdir(directory):
        raise UsageError(
            f"--output={output}: the directory {directory!r} does not exist."
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(
            f"--output={output}: the directory {directory!r} is not writable."
        )
    if os.path.isdir(absolute):
        raise UsageError(f"--output={output} is a directory.")
    if os.path.exists(absolute) and not overwrite:
        raise UsageError(
            f"--output={output} exists already; pass --overwrite to replace it."
        )


class _StoredMember(io.RawIOBase):
    """An uncompressed member of a zip archive, read in place.

    `zipfile` rereads a member from its start on every backward seek (before
    Python 3.12); HDF5 seeks back and forth through its metadata.
    """

    def __init__(self, file, start, size):
        self._file, self._start, self._size = file, start, size
        self._position = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._position

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position}
        self._position = base.get(whence, self._size) + offset
        return self._position

    def readinto(self, buffer):
        count = max(0, min(len(buffer), self._size - self._position))
        self._file.seek(self._start + self._position)
        count = self._file.readinto(memoryview(buffer)[:count])
        self._position += count
        return count


def _open_weights(archive_file):
    """A file object of the HDF5 weights in an open `.keras` archive."""
    archive = zipfile.ZipFile(archive_file)
    info = archive.getinfo(_WEIGHTS_MEMBER)
    if info.compress_type != zipfile.ZIP_STORED:
        return archive.open(info)
    # The data follow the member's local header: 30 bytes, then its name
    # and extra field, whose lengths end the header.
    archive_file.seek(info.header_offset + 26)
    name_length, extra_length = struct.unpack("<HH", archive_file.read(4))
    start = info.header_offset + 30 + name_length + extra_length
    return _StoredMember(archive_file, start, info.file_size)


def layout(path) -> dict:
    """The variables of a weights file: `{name: (shape, is_float)}`.

    The optimizer's state is left out: it is not averaged.
    """
    import h5py  # noqa: PLC0415 (only once the flags are valid)

    found = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset) and (
            name.split("/")[0] != _OPTIMIZER_GROUP
        ):
            dtype = item.attrs.get("dtype") or item.dtype.name
            found[name] = (item.shape, str(dtype) in _FLOAT_DTYPES)

    try:
        with open(path, "rb") as file:
            source = file
            if path.endswith(".keras"):
                source = _open_weights(file)
            with h5py.File(source, "r") as weights:
                weights.visititems(visit)
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise UsageError(
            f"cannot read the weights of {path!r} as a file saved by Keras: "
            f"{reason}"
        ) from None
    return found


def _differences(layout, reference):
    missing = sorted(set(reference) - set(layout))
    extra = sorted(set(layout) - set(reference))
    problems = []
    if missing:
        problems.append(f"it lacks the variables {missing[:3]}")
    if extra:
        problems.append(f"it has variables the others lack: {extra[:3]}")
    for name in sorted(set(layout) & set(reference)):
        shape, is_float = layout[name]
        other_shape, other_float = reference[name]
        if shape != other_shape:
            problems.append(f"{name} has shape {shape}, not {other_shape}")
        elif is_float != other_float:
            problems.append(f"{name} is {'' if is_float else 'not '}a float")
    return "; ".join(problems[:3])


def check_layouts(files, architecture, given):
    """Checks that every file holds the variables of the architecture.

    With `--model` (`given`), a file that differs from it is named. Else the
    architecture is the last `.keras` input; the files are grouped by their
    layout, and the files outside the largest group (the architecture's
    group on a tie) are named, so that one odd checkpoint is blamed, not the
    others.
    """
    layouts = {path: layout(path) for path in files}
    reference = layout(architecture) if given else layouts[architecture]
    groups = {}
    for path in files:
        groups.setdefault(repr(sorted(layouts[path].items())), []).append(path)
    if len(groups) == 1 and (not given or layouts[files[0]] == reference):
        return
    if given:
        odd = next(path for path in files if layouts[path] != reference)
        raise UsageError(
            f"{odd!r} was not saved from the architecture of --model="
            f"{architecture}: {_differences(layouts[odd], reference)}."
        )
    majority = max(
        groups.values(), key=lambda group: (len(group), architecture in group)
    )
    odd = [path for path in files if path not in majority]
    others = repr(majority[0])
    if len(majority) > 1:
        others = f"the {len(majority)} other files"
    more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
    raise UsageError(
        f"{odd[0]!r}{more} was saved from another architecture than {others}: "
        f"{_differences(layouts[odd[0]], layouts[majority[-1]])}."
    )


def plan(arguments) -> Plan:
    """Parses and checks the arguments; exits with status 2 on a mistake."""
    argument_parser = parser()
    args = argument_parser.parse_args(arguments)
    try:
        found = expand(args.files)
        files = found[-args.last:] if args.last is not None else found
        architecture = _architecture(files, args.model)
        _check_output(args.output, files, architecture, args.overwrite)
        check_layouts(files, architecture, given=args.model is not None)
    except UsageError as error:
        argument_parser.error(str(error))
    return Plan(tuple(files), len(found), architecture, args.output)


# The plan that `check_before_import` made, with its arguments: the tool's
# `main` takes it instead of checking every file twice.
_before_import = None


def checked_plan(arguments) -> Plan:
    """`plan(arguments)`, or the plan made for them before Keras was
    imported (taken once: a later call checks the files again)."""
    global _before_import
    made, _before_import = _before_import, None
    if made is not None and made[0] == tuple(arguments):
        return made[1]
    return plan(arguments)


def _running_the_tool():
    # While `python -m` imports the packages of its module, sys.argv[0] is
    # "-m"; sys.orig_argv ends with the module's name and its arguments.
    if sys.argv[:1] != ["-m"]:
        return False
    options = sys.orig_argv[: len(sys.orig_argv) - len(sys.argv) + 1]
    return (
        options[-2:] == ["-m", _MODULE] or options[-1:] == ["-m" + _MODULE]
    )


def check_before_import() -> None:
    """Checks the tool's arguments when `keras_swa` is imported for it.

    Called by the package before it imports Keras; does nothing unless the
    program is `python -m keras_swa.average`.
    """
    global _before_import
    if _running_the_tool():
        _before_import = (tuple(sys.argv[1:]), plan(sys.argv[1:]))
