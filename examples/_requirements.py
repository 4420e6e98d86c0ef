"""The one-line check that the `examples` extra is installed.

The example binaries need packages the library does not (absl-py for their
flags, TensorFlow and tensorflow-datasets for their data, scikit-learn for
the digits, Matplotlib for the figures). Without one, a binary would end in
an `ImportError` traceback, at its start or, for Matplotlib, after training.
`require` looks for all of them first, without importing any (so it costs
milliseconds), and ends the binary with one line naming the missing package
and the command that installs the extra. It imports nothing outside the
standard library, so it can run before the binary's own imports.
"""

import importlib.util
import sys

# Import name -> package name on PyPI.
EXAMPLES_EXTRA = {
    "absl": "absl-py",
    "numpy": "numpy",
    "keras": "keras",
    "tensorflow": "tensorflow",
    "tensorflow_datasets": "tensorflow-datasets",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
}
INSTALL = 'pip install ".[examples]"'
USAGE_EXIT_CODE = 2  # as `_cli.fail`


def missing(modules):
    """The names of `modules` (import names) that cannot be imported."""
    absent = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or blocked package
            found = False
        if not found:
            absent.append(name)
    return absent


def require(prog, modules=tuple(EXAMPLES_EXTRA)):
    """Ends the program `prog` with one line on stderr and exit status 2 if
    a package of `modules` (import names of `EXAMPLES_EXTRA`) is missing."""
    absent = missing(modules)
    if not absent:
        return
    packages = ", ".join(EXAMPLES_EXTRA[name] for name in absent)
    verb = "is" if len(absent) == 1 else "are"
    sys.stderr.write(
        f"{prog}: error: {packages} {verb} not installed: the example binaries need "
        f"the `examples` extra; from the checkout's root: {INSTALL}\n"
    )
    sys.stderr.flush()
    sys.exit(USAGE_EXIT_CODE)
