"""TensorFlow is optional: what the package declares, and a run without it.

A JAX or PyTorch user installs `keras-weight-averaging` with the `jax` extra
(or torch by hand) and gets no TensorFlow; `make demo` and `make test` install
the `tensorflow` extra among everything else.
"""

import ast
import os
import re
import subprocess
import sys
import textwrap

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        return tomllib.load(file)


def _names(requirements):
    return {
        re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower()
        for requirement in requirements
    }


def test_tensorflow_is_an_extra_not_a_dependency():
    project = _pyproject()["project"]
    assert "tensorflow" not in _names(project["dependencies"])
    assert "keras" in _names(project["dependencies"])
    extras = project["optional-dependencies"]
    assert "tensorflow" in _names(extras["tensorflow"])
    assert "jax" in _names(extras["jax"])
    # The example binaries read data with tf.data on every backend.
    assert "tensorflow" in _names(extras["examples"])


def test_make_installs_every_extra():
    """`make demo` / `make test` / `make docs` need all of them."""
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as file:
        makefile = file.read()
    extras = set(
        re.search(r"^EXTRAS := (\S+)$", makefile, re.M).group(1).split(",")
    )
    declared = set(_pyproject()["project"]["optional-dependencies"])
    # `jax` is inside `backends`, which also brings the pinned CPU torch.
    assert declared - {"jax"} <= extras, declared - extras


def test_installed_keras_meets_the_declared_floor():
    from packaging.requirements import Requirement

    (keras_requirement,) = [
        Requirement(requirement)
        for requirement in _pyproject()["project"]["dependencies"]
        if Requirement(requirement).name == "keras"
    ]
    assert keras_requirement.specifier.contains(keras.__version__), (
        keras.__version__, str(keras_requirement.specifier)
    )


def _module_level_imports(tree):
    """Imports that run when the module is imported (not inside functions)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        pending.extend(ast.iter_child_nodes(node))


def test_no_module_imports_tensorflow_at_import_time():
    offenders = []
    package = os.path.join(ROOT, "keras_swa")
    for directory, _, files in os.walk(package):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            with open(path, encoding="utf-8") as file:
                tree = ast.parse(file.read(), path)
            for module in _module_level_imports(tree):
                if module.split(".")[0] == "tensorflow":
                    offenders.append(f"{os.path.relpath(path, ROOT)}: {module}")
    assert not offenders, offenders


# Runs in a fresh process that cannot import TensorFlow, as where it is not
# installed: the SWA wrapper, the callback, update_bn (through bn_data), the
# swaps, saving and loading, on NumPy data and a PyDataset.
_WITHOUT_TENSORFLOW = textwrap.dedent(
    """
    import sys

    # `import tensorflow` raises ModuleNotFoundError, and
    # `importlib.util.find_spec("tensorflow")` (how Keras and PyTorch probe
    # for it) returns None, as where it is not installed.
    sys.modules["tensorflow"] = None
    sys.modules["tensorflow_datasets"] = None

    import os
    import numpy as np
    import keras
    import keras_swa

    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 4)).astype("float32")
    y = rng.normal(size=(48, 1)).astype("float32")

    def model():
        m = keras.Sequential([
            keras.Input((4,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(1),
        ])
        return m

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)]

    m = model()
    m.compile(optimizer=keras_swa.SWA(keras.optimizers.SGD(0.01),
                                      start_averaging=2, average_period=2),
              loss="mse")
    m.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert int(m.optimizer.n_averaged.numpy()) == 2
    with keras_swa.averaged_weights(m, bn_data=Batches()):
        m.evaluate(x, y, verbose=0)
    keras_swa.assign_average(m, bn_data=(x,), verbose=0)
    path = os.path.join(sys.argv[1], "swa.keras")
    m.save(path)
    loaded = keras.models.load_model(path)
    assert int(loaded.optimizer.n_averaged.numpy()) == 2

    m = model()
    m.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=1, swa_lr=0.005, bn_data=x, validation_data=(x, y),
        verbose=0)
    history = m.fit(x, y, batch_size=16, epochs=3, callbacks=[swa], verbose=0)
    assert "val_swa_loss" in history.history
    assert int(swa.n_averaged.numpy()) == 2

    assert sys.modules["tensorflow"] is None  # nothing replaced the block
    print("ran without TensorFlow on", keras.backend.backend())
    """
)


def test_runs_without_tensorflow(tmp_path):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        pytest.skip("The TensorFlow backend needs TensorFlow.")
    completed = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": backend},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert f"ran without TensorFlow on {backend}" in completed.stdout


def test_every_subpackage_goes_into_the_wheel():
    """A wheel holds the packages setuptools finds; an editable install maps
    the whole directory and would hide a missing one."""
    setuptools = pytest.importorskip("setuptools")
    find = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    packaged = set(
        setuptools.find_packages(
            where=ROOT, include=find["include"], exclude=find.get("exclude", ())
        )
    )
    on_disk = set()
    for directory, _, files in os.walk(os.path.join(ROOT, "keras_swa")):
        if "__pycache__" in directory:
            continue
        if any(name.endswith(".py") for name in files):
            relative = os.path.relpath(directory, ROOT)
            on_disk.add(relative.replace(os.sep, "."))
    assert on_disk == packaged, (on_disk, packaged)
