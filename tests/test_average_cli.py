"""Tests of the command-line tool `python -m keras_swa.average`."""

import io
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from keras_swa import _average_args
from keras_swa import average

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `--help` and a mistake answer before Keras is imported, in well under 2 s
# on a quiet machine (0.2 s measured); the bound leaves room for a loaded CI.
_FAST_SECONDS = 4.0


def _model(hidden=8):
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(hidden),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(2),
        ]
    )


def _save_checkpoints(directory, names, hidden=8):
    """Saves `.keras`/`.weights.h5` files with random weights; returns them."""
    rng = np.random.default_rng(0)
    model = _model(hidden)
    stored = {}
    for name in names:
        weights = [
            rng.normal(size=w.shape).astype("float32") for w in model.weights
        ]
        # BatchNormalization's moving variance stays positive.
        weights[5] = np.abs(weights[5]) + 0.5
        model.set_weights(weights)
        path = os.path.join(directory, name)
        if name.endswith(".keras"):
            model.save(path)
        else:
            model.save_weights(path)
        stored[path] = weights
    return stored


def _run(*arguments, env=None):
    return subprocess.run(
        [sys.executable, "-m", "keras_swa.average", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _assert_mean(output, stored, chosen):
    model = keras.models.load_model(output)
    for i, variable in enumerate(model.weights):
        expected = np.mean(
            [stored[p][i].astype("float64") for p in chosen], axis=0
        )
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(variable), expected, rtol=1e-6,
            atol=1e-7,
        )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two `.keras` files and a `.weights.h5` file of one architecture, and
    one `.keras` file of another (Dense(5) instead of Dense(8))."""
    directory = tmp_path_factory.mktemp("average_cli")
    _FILES.update(
        _save_checkpoints(
            str(directory), ["a.keras", "b.keras", "w.weights.h5"]
        )
    )
    _save_checkpoints(str(directory), ["other.keras"], hidden=5)
    (directory / "out").mkdir()
    (directory / "exists.keras").write_text("")
    return directory


# The weights that `files` saved, by path.
_FILES = {}


def _without_keras(tmp_path):
    """An environment in which `import keras` fails loudly."""
    fake = tmp_path / "fake_keras" / "keras"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ImportError('KERAS IMPORTED BEFORE THE ARGUMENTS WERE CHECKED')"
    )
    return {**os.environ, "PYTHONPATH": str(fake.parent)}


# (arguments, what the error line says); `{d}` is the files' directory.
_MISTAKES = [
    (["--last=2", "{d}/a.keras"], "--output"),
    (["--output={d}/avg.h5", "{d}/a.keras"], "must end in `.keras`"),
    (["--output={d}/avg.keras", "--last=two", "{d}/a.keras"], "--last"),
    (["--output={d}/avg.keras", "--last=0", "{d}/a.keras"], "--last"),
    (["--output={d}/avg.keras", "--lats=2", "{d}/a.keras"], "--lats"),
    (["--output={d}/avg.keras"], "no input files"),
    (["--output={d}/avg.keras", "{d}/none_*.keras"], "no file matches"),
    (["--output={d}/avg.keras", "{d}/missing.keras"], "missing.keras"),
    (["--output={d}/avg.keras", "{d}/a.keras", "{d}/a.keras"], "given twice"),
    (["--output={d}/avg.keras", "{d}/a.txt"], "neither a `.keras`"),
    (["--output={d}/avg.keras", "{d}/exists.keras"], "cannot read the weig"),
    # Issue 21, point 16: a missing directory failed after all the work.
    (["--output={d}/no/such/dir/avg.keras", "{d}/a.keras"], "does not exist"),
    (["--output={d}/out", "{d}/a.keras"], "must end in"),
    (["--output={d}/exists.keras", "{d}/a.keras"], "--overwrite"),
    (
        ["--output={d}/b.keras", "{d}/a.keras", "{d}/b.keras"],
        "one of the input",
    ),
    (["--output={d}/avg.keras", "{d}/w.weights.h5"], "--model=ARCH.keras"),
    (
        ["--output={d}/avg.keras", "--model={d}/w.weights.h5", "{d}/a.keras"],
        "--model",
    ),
    (
        ["--output={d}/avg.keras", "--model={d}/gone.keras", "{d}/a.keras"],
        "gone.keras",
    ),
    # The odd file is named, not the first one that differs from the last.
    (
        ["--output={d}/avg.keras", "{d}/a.keras", "{d}/b.keras",
         "{d}/other.keras"],
        "'{d}/other.keras' was saved from another architecture than the 2",
    ),
    (
        ["--output={d}/avg.keras", "--model={d}/other.keras",
         "{d}/w.weights.h5"],
        "'{d}/w.weights.h5' was not saved from the architecture of --model",
    ),
]


_MISTAKE_IDS = [
    "no_output", "output_not_keras", "last_not_int", "last_zero",
    "unknown_flag", "no_inputs", "no_match", "missing_input", "input_twice",
    "input_not_keras", "input_not_a_keras_file", "output_dir_missing", "output_is_dir", "output_exists",
    "output_is_input", "weights_without_model", "model_not_keras",
    "model_missing", "odd_architecture_named", "weights_not_of_model",
]


@pytest.mark.parametrize("arguments, message", _MISTAKES, ids=_MISTAKE_IDS)
def test_mistake_answers_before_keras_with_usage_and_one_line(
    files, tmp_path, arguments, message
):
    """Exit 2, a usage line and one error line, fast, and no Keras import
    (a fake `keras` package that raises would show in a traceback)."""
    arguments = [a.format(d=files) for a in arguments]
    start = time.perf_counter()
    result = _run(*arguments, env=_without_keras(tmp_path))
    elapsed = time.perf_counter() - start
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 2 and lines[0].startswith("usage: "), result.stderr
    assert lines[1].startswith("python -m keras_swa.average: error: ")
    assert message.format(d=files) in lines[1]
    assert elapsed < _FAST_SECONDS, f"{elapsed:.1f} s"


def test_help_answers_before_keras(tmp_path):
    start = time.perf_counter()
    result = _run("--help", env=_without_keras(tmp_path))
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: python -m keras_swa.average")
    assert "--model" in result.stdout and "--last" in result.stdout
    assert elapsed < _FAST_SECONDS, f"{elapsed:.1f} s"


@pytest.mark.slow
def test_round_trip_of_weights_files_with_model_in_natural_order(tmp_path):
    """The whole program: `.weights.h5` inputs with `--model`, `--last=2`
    in natural order (2 before 10), against the NumPy mean."""
    names = ["ckpt_1.weights.h5", "ckpt_2.weights.h5", "ckpt_10.weights.h5"]
    stored = _save_checkpoints(str(tmp_path), names + ["model.keras"])
    output = str(tmp_path / "avg.keras")
    result = _run(
        f"--output={output}",
        "--last=2",
        f"--model={tmp_path / 'model.keras'}",
        str(tmp_path / "ckpt_*.weights.h5"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = [str(tmp_path / name) for name in names[1:]]
    for path in chosen:
        assert path in result.stdout
    assert str(tmp_path / names[0]) not in result.stdout
    assert "AVERAGED" in result.stdout and "update_bn" in result.stdout
    _assert_mean(output, stored, chosen)


def test_keras_files_averaged_in_process(files, tmp_path):
    """`.keras` and `.weights.h5` inputs mixed, the architecture from the
    last `.keras` file; an existing output replaced with `--overwrite`."""
    output = tmp_path / "avg.keras"
    output.write_text("")
    inputs = [str(files / n) for n in ("a.keras", "w.weights.h5", "b.keras")]
    plan = _average_args.plan([f"--output={output}", "--overwrite", *inputs])
    assert plan.architecture == inputs[-1]
    report = io.StringIO()
    average.average(plan, out=report)
    assert f"Wrote {output}" in report.getvalue()
    _assert_mean(str(output), _FILES, inputs)


def test_file_with_nan_fails_in_one_line_and_writes_nothing(tmp_path, capsys):
    stored = _save_checkpoints(str(tmp_path), ["a.keras", "nan.weights.h5"])
    model = _model()
    weights = stored[str(tmp_path / "nan.weights.h5")]
    weights[0][0, 0] = np.nan
    model.set_weights(weights)
    model.save_weights(str(tmp_path / "nan.weights.h5"))
    output = tmp_path / "avg.keras"
    with pytest.raises(SystemExit) as exit_info:
        average.main(
            [f"--output={output}", str(tmp_path / "a.keras"),
             str(tmp_path / "nan.weights.h5")]
        )
    message = str(exit_info.value.code)
    assert "nan.weights.h5" in message and "\n" not in message
    assert not output.exists()


def test_layout_of_a_compressed_keras_file_is_read_too(files, tmp_path):
    """Keras stores the weights member uncompressed (read in place); a
    `.keras` file zipped again with compression is read through zipfile."""
    import zipfile

    source = str(files / "a.keras")
    deflated = str(tmp_path / "deflated.keras")
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(
        deflated, "w", compression=zipfile.ZIP_DEFLATED
    ) as target:
        for info in archive.infolist():
            target.writestr(info.filename, archive.read(info))
    with zipfile.ZipFile(deflated) as archive:
        member = archive.getinfo("model.weights.h5")
        assert member.compress_type == zipfile.ZIP_DEFLATED
    stored = _average_args.layout(source)
    assert stored and _average_args.layout(deflated) == stored
    assert stored == _average_args.layout(str(files / "w.weights.h5"))
