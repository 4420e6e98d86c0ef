"""Tests of the command-line tool `python -m keras_swa.average`."""

import io
import os
import subprocess
import sys

from absl.testing import flagsaver
import keras
import numpy as np
import pytest

from keras_swa import average

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    """Saves `.keras` files with random weights; returns their weights."""
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
        model.save(path)
        stored[path] = weights
    return stored


def _run(*arguments):
    return subprocess.run(
        [sys.executable, "-m", "keras_swa.average", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _last_line(text):
    return text.strip().splitlines()[-1]


@pytest.mark.slow
def test_round_trip_averages_the_last_files_in_natural_order(tmp_path):
    stored = _save_checkpoints(
        str(tmp_path), ["ckpt_1.keras", "ckpt_2.keras", "ckpt_10.keras"]
    )
    output = str(tmp_path / "avg.keras")
    pattern = str(tmp_path / "ckpt_*.keras")
    result = _run(f"--output={output}", "--last=2", pattern)
    assert result.returncode == 0, result.stderr[-3000:]
    # Natural order: 2 before 10, so the last two are 2 and 10.
    chosen = [str(tmp_path / "ckpt_2.keras"), str(tmp_path / "ckpt_10.keras")]
    for path in chosen:
        assert path in result.stdout
    assert str(tmp_path / "ckpt_1.keras") not in result.stdout
    assert "AVERAGED" in result.stdout and "update_bn" in result.stdout

    model = keras.models.load_model(output)
    for i, variable in enumerate(model.weights):
        expected = np.mean(
            [stored[p][i].astype("float64") for p in chosen], axis=0
        )
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6)


@pytest.mark.slow
def test_bad_flag_gets_one_line_naming_it(tmp_path):
    _save_checkpoints(str(tmp_path), ["a.keras"])
    output = f"--output={tmp_path / 'avg.keras'}"
    result = _run(output, "--last=0", str(tmp_path / "a.keras"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "--last" in _last_line(result.stderr)


@pytest.mark.slow
def test_file_of_another_architecture_is_named_and_nothing_written(tmp_path):
    _save_checkpoints(str(tmp_path), ["a.keras"])
    _save_checkpoints(str(tmp_path), ["b.keras"], hidden=5)
    output = tmp_path / "avg.keras"
    result = _run(f"--output={output}", str(tmp_path / "*.keras"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "a.keras" in _last_line(result.stderr)
    assert not output.exists()


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--last=2", "x.keras"], "--output"),
        (["--output=avg.h5", "x.keras"], "--output"),
        (["--output=avg.keras", "--last=two", "x.keras"], "--last"),
        (["--output=avg.keras", "--last=-1", "x.keras"], "--last"),
        (["--output=avg.keras", "--lats=2", "x.keras"], "lats"),
    ],
)
def test_flag_errors_exit_with_one_line(argv, flag):
    with flagsaver.flagsaver():
        with pytest.raises(SystemExit) as exit_info:
            average.parse_flags(["average", *argv])
    message = str(exit_info.value.code)
    assert flag in message and "\n" not in message


def test_input_errors(tmp_path):
    stored = _save_checkpoints(str(tmp_path), ["e_1.keras", "e_2.keras"])
    first, second = stored
    output = str(tmp_path / "avg.keras")
    cases = [
        ([], output, "no input files"),
        ([str(tmp_path / "none_*.keras")], output, "no file matches"),
        ([str(tmp_path / "missing.keras")], output, "missing.keras"),
        ([first, first], output, "given twice"),
        ([first, str(tmp_path / "w.weights.h5")], output, "not a `.keras`"),
        ([first, second], second, "one of the input files"),
    ]
    for arguments, out, message in cases:
        with pytest.raises(average._Error, match=message):
            average.average(arguments, out, out=io.StringIO())
    open(output, "w").close()
    with pytest.raises(average._Error, match="--overwrite"):
        average.average([first, second], output)
