"""Every code snippet of README.md and docs/ runs as written.

Each page's ```python blocks run in order, in one namespace, in a fresh
temporary directory. For time, the pages run on one backend, JAX where it is
installed (else this run's backend; `KERAS_SWA_SNIPPETS_BACKEND=<name>`
picks another, `=all` runs them on every backend): the suite runs once per
backend, and the snippets' code is the same on all three. A page with blocks
written for one backend (`# Backend: <name>`, below) runs on every backend,
with the blocks of that backend.

The namespace starts with the page's prelude only: names the page assumes (a
`model`, `train_ds`, ...) built on tiny generated data, so that a missing
import or a name used before it is defined fails here as it would for a
reader. The prelude (`_prelude`):

- `keras` and `keras_swa`, imported (no other module: a snippet imports
  `glob`, `os`, `numpy` or `tensorflow` itself);
- `x_train`, `y_train` (32 samples, 8 features, 2 classes as int labels),
  `x_val`, `y_val` and `x_test` (16 samples each, int labels); `x`, `y`,
  `y_test`: the same inputs with one-hot float targets, for `loss="mse"`;
- `train_ds`, `val_ds`, `test_ds`, `train_eval_ds`: batches of 16 of them
  (a `tf.data.Dataset` on TensorFlow, where `fit` runs it fastest, a
  `keras.utils.PyDataset` on the other backends; both have a `len`);
- `make_model()`: Dense(16), BatchNormalization, ReLU, Dense(2) (softmax,
  or logits on the pages of `_LOGITS`), and `model`, one of them compiled
  with SGD(0.05, momentum=0.9), sparse categorical cross-entropy and
  accuracy;
- on some pages, files the page reads (`_FILES`).

The pages of `_STANDALONE` (a complete script) get no prelude at all.

On the pages of `_FRESH_MODEL`, the blocks are alternative recipes: each
block gets a new compiled `model` (other names carry over). A
`python -m keras_swa.average ...` line of a ```sh block runs in process, in
its place among the blocks, so that it must match the files the snippets
wrote. A block written for one backend starts with the visible line
`# Backend: <name>` and runs on that backend only. A block that cannot run
here starts with the visible line
`# Not run by tests/test_snippets.py: <reason>`; it is listed as a skip with
that reason.
"""

import contextlib
import glob
import importlib.util
import io
import os
import re
import shlex

import keras
import numpy as np
import pytest

import keras_swa
from keras_swa import average

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAGES = ["README.md"] + sorted(
    os.path.relpath(path, ROOT)
    for path in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
)

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<language>python|sh)[ \t]*\n(?P<code>.*?)"
    r"^(?P=indent)```[ \t]*$",
    re.S | re.M,
)
_NOT_RUN = re.compile(r"# Not run by tests/test_snippets\.py: (?P<reason>.*)")
_BACKEND = re.compile(r"# Backend: (?P<backend>tensorflow|jax|torch)")
_CLI = "python -m keras_swa.average"

_SNIPPET_BACKEND = os.environ.get("KERAS_SWA_SNIPPETS_BACKEND") or (
    "jax" if importlib.util.find_spec("jax") else keras.backend.backend()
)

# Pages whose blocks are alternatives, each for a fresh model.
_FRESH_MODEL = {"README.md"}
# Pages whose model outputs logits (`from_logits=True` in their snippets).
_LOGITS = {"docs/swag.md"}
# Pages of complete programs: they run with no prelude.
_STANDALONE = {"docs/first_script.md", "docs/guide/custom_loops.md"}


def _blocks(page):
    """The page's blocks: `(line, language, code, reason)`, in order;
    `reason` is None for a block that runs (on this backend)."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as file:
        text = file.read()
    blocks = []
    for match in _FENCE.finditer(text):
        indent = match.group("indent")
        code = "".join(
            line[len(indent):] if line.startswith(indent) else line
            for line in match.group("code").splitlines(keepends=True)
        )
        first = code.lstrip().splitlines()[0] if code.strip() else ""
        not_run = _NOT_RUN.fullmatch(first.strip())
        backend = _BACKEND.fullmatch(first.strip())
        reason = not_run.group("reason") if not_run else None
        if backend and backend.group("backend") != keras.backend.backend():
            reason = f"written for the {backend.group('backend')} backend"
        blocks.append((
            text.count("\n", 0, match.start()) + 1,
            match.group("language"),
            code,
            reason,
        ))
    return blocks


class _Batches(keras.utils.PyDataset):
    """Batches of arrays, for every backend."""

    def __init__(self, *arrays, batch_size=16):
        super().__init__()
        self.arrays, self.batch_size = arrays, batch_size

    def __len__(self):
        return -(-len(self.arrays[0]) // self.batch_size)

    def __getitem__(self, index):
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        batch = tuple(array[part] for array in self.arrays)
        return batch if len(batch) > 1 else batch[0]


def _batches(*arrays):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        return tf.data.Dataset.from_tensor_slices(arrays).batch(16)
    return _Batches(*arrays)


def _prelude(page):
    """The names the snippets of `page` assume (see the module docstring)."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)

    def data(count):
        inputs = rng.normal(size=(count, 8)).astype("float32")
        return inputs, (inputs[:, 0] + inputs[:, 1] > 0).astype("int32")

    x_train, y_train = data(32)
    x_val, y_val = data(16)
    x_test, labels_test = data(16)
    logits = page in _LOGITS

    def make_model():
        return keras.Sequential([
            keras.Input((8,)),
            keras.layers.Dense(16),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(2, activation=None if logits else "softmax"),
        ])

    def compiled_model():
        model = make_model()
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=logits),
            metrics=["accuracy"],
        )
        return model

    names = dict(
        keras=keras, keras_swa=keras_swa,
        x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
        x_test=x_test, x=x_train,
        y=np.eye(2, dtype="float32")[y_train],
        y_test=np.eye(2, dtype="float32")[labels_test],
        train_ds=_batches(x_train, y_train),
        train_eval_ds=_batches(x_train, y_train),
        val_ds=_batches(x_val, y_val),
        test_ds=_batches(x_test, labels_test),
        make_model=make_model,
        model=compiled_model(),
    )
    _FILES.get(page, lambda names: None)(names)
    return names, compiled_model


def _finetuned_models(names):
    # checkpoints.md's greedy soup reads fine-tuned models of one base.
    os.makedirs("finetuned")
    model = names["model"]
    for index in range(3):
        model.fit(names["train_ds"], epochs=1, verbose=0)
        model.save(f"finetuned/{index}.keras")


def _swa_model(names):
    # faq.md loads a model that was compiled with SWA.
    model = names["make_model"]()
    model.compile(optimizer=keras_swa.SWA(keras.optimizers.SGD(0.1)), loss="mse")
    model.fit(names["x"], names["y"], epochs=1, verbose=0)
    model.save("swa_model.keras")


_FILES = {"docs/checkpoints.md": _finetuned_models, "docs/faq.md": _swa_model}


def _run_cli(code, line):
    """Runs the `python -m keras_swa.average` commands of a ```sh block."""
    for command in code.replace("\\\n", " ").splitlines():
        command = command.split("#", 1)[0].strip()
        if not command.startswith(_CLI):
            continue
        arguments = shlex.split(command)[len(_CLI.split()):]
        try:
            average.main(arguments)
        except SystemExit as error:
            raise AssertionError(
                f"line {line}: `{command}` exited with {error.code}"
            ) from None


def _for_one_backend(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as file:
        return re.search(r"^[ \t]*# Backend: ", file.read(), re.M) is not None


# The pages with a Python block (a page without one has nothing to run).
_CODE_PAGES = [
    page for page in PAGES
    if any(language == "python" for _, language, _, _ in _blocks(page))
]


@pytest.mark.parametrize("page", _CODE_PAGES)
def test_page_snippets_run(page, tmp_path, monkeypatch):
    blocks = [block for block in _blocks(page) if block[3] is None]
    if not any(language == "python" for _, language, _, _ in blocks):
        pytest.skip(f"no Python block of {page} runs here")
    backend = keras.backend.backend()
    if _SNIPPET_BACKEND not in ("all", backend) and not _for_one_backend(page):
        pytest.skip(
            f"the snippets run on {_SNIPPET_BACKEND} (set "
            "KERAS_SWA_SNIPPETS_BACKEND=all to run them on every backend)"
        )
    monkeypatch.chdir(tmp_path)
    # A snippet may set KERAS_BACKEND for a later process; not for this one.
    monkeypatch.setenv("KERAS_BACKEND", keras.backend.backend())
    namespace = {"__name__": "__main__"}
    if page not in _STANDALONE:
        names, compiled_model = _prelude(page)
        namespace.update(names)
    for line, language, code, _ in blocks:
        if language == "sh":
            _run_cli(code, line)
            continue
        if page in _FRESH_MODEL:
            namespace["model"] = compiled_model()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(code, f"{page}:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(
                f"the snippet at {page}:{line} failed: "
                f"{type(error).__name__}: {error}"
            ) from error


_MARKED = [
    pytest.param(page, line, reason, id=f"{page}:{line}")
    for page in PAGES
    for line, _, _, reason in _blocks(page)
    if reason is not None and not reason.startswith("written for the")
]


@pytest.mark.parametrize("page, line, reason", _MARKED)
def test_marked_snippet_says_why_it_is_not_run(page, line, reason):
    assert len(reason.strip()) > 10, f"{page}:{line} gives no reason"
    pytest.skip(f"{page}:{line} is not run: {reason}")
