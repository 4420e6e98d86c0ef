"""The example binaries, end to end on tiny settings (no download)."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from examples import data as data_lib
from examples import models as models_lib
from examples import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(tmp_path, **overrides):
    base = dict(
        dataset="digits", data_dir=None, download=False, model="small_cnn",
        epochs=3, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4,
        swa_start="1", swa_lr=0.01, ema_decay=0.9, averaging="compare", seed=0,
        output_dir=str(tmp_path / "out"), verbose=0,
    )
    base.update(overrides)
    return base


def run_binary(module, *args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=timeout,
    )


def test_compare_on_digits_writes_table_metrics_and_curves(tmp_path, capsys):
    cfg = config(tmp_path)
    metrics = train_lib.train(cfg)

    out = capsys.readouterr().out
    for label in ("SGD (plain)", "SWA: final iterate", "SWA: average", "EMA: average"):
        assert label in out
    with open(tmp_path / "out" / "metrics.json") as f:
        saved = json.load(f)
    assert set(saved["final"]) == {"sgd", "swa_iterate", "swa", "ema"}
    assert saved["swa_start_epoch"] == 1
    for run in ("sgd", "swa", "ema"):
        assert len(saved["runs"][run]["history"]["val_accuracy"]) == 3
    # Epochs 1 and 2 are averaged: the averaged model is logged for both.
    assert len(saved["runs"]["swa"]["history"]["val_swa_accuracy"]) == 2
    # The SWA run's final evaluation is of the average, not of the iterate.
    assert metrics["final"]["swa"] != metrics["final"]["swa_iterate"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in saved["final"].values())
    png = (tmp_path / "out" / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_learning_rate_schedules_follow_the_paper():
    plain = train_lib.paper_schedule(0.1, 100, 0.01)
    assert plain(0) == plain(50) == 0.1
    assert plain(70) == pytest.approx(0.1 * (1 - 0.99 * 0.5))
    assert plain(95) == pytest.approx(0.001)
    swa = train_lib.paper_schedule(0.1, 60, 0.05 / 0.1)
    assert swa(54) == pytest.approx(0.05) and swa(80) == pytest.approx(0.05)


def test_tfds_dataset_through_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        dataset = data_lib.load("cifar10", batch_size=8)
        x, y = next(iter(dataset.train))
        assert x.shape == (8, 32, 32, 3) and x.dtype == "float32"
        assert dataset.num_classes == 10 and dataset.input_shape == (32, 32, 3)
        metrics = train_lib.train(
            config(tmp_path, dataset="cifar10", averaging="swa", epochs=2, batch_size=8)
        )
    assert set(metrics["final"]) == {"swa_iterate", "swa"}


def write_idx(path, array):
    header = b"\x00\x00\x08" + bytes([array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_from_idx_files_in_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, size=(40, 28, 28)),
        "y_train": rng.integers(0, 10, size=(40,)),
        "x_test": rng.integers(0, 256, size=(12, 28, 28)),
        "y_test": rng.integers(0, 10, size=(12,)),
    }
    for key, name in data_lib.IDX_FILES.items():
        write_idx(tmp_path / name, arrays[key])
    np.testing.assert_array_equal(
        data_lib.read_idx(tmp_path / data_lib.IDX_FILES["x_test"]), arrays["x_test"]
    )
    dataset = data_lib.load("mnist", batch_size=16, data_dir=str(tmp_path))
    assert dataset.train_size == 40 and dataset.input_shape == (28, 28, 1)
    x, y = next(iter(dataset.test))
    np.testing.assert_allclose(x.numpy()[..., 0], arrays["x_test"][:12] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y.numpy(), arrays["y_test"])

    metrics = train_lib.train(
        config(tmp_path, dataset="mnist", data_dir=str(tmp_path), averaging="sgd", swa_start="0",
               epochs=1, batch_size=16)
    )
    assert set(metrics["final"]) == {"sgd"}


def test_missing_dataset_error_says_how_to_provide_it(tmp_path):
    with pytest.raises(ValueError, match="--data_dir"):
        data_lib.load("mnist", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="Unknown dataset"):
        data_lib.load("no_such_dataset_xyz", data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"epochs": 0}, "--epochs"),
        ({"lr": 0.0}, "--lr"),
        ({"swa_lr": -1.0}, "--swa_lr"),
        ({"momentum": 1.0}, "--momentum"),
        ({"swa_start": "5"}, "--swa_start"),
        ({"swa_start": "1.5"}, "--swa_start"),
        ({"swa_start": "soon"}, "--swa_start"),
    ],
)
def test_bad_flags_are_rejected_with_the_flag_named(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        train_lib.validate(config(tmp_path, **overrides))


def test_swa_start_fraction_and_epoch():
    assert train_lib.parse_swa_start("0.75", 40) == 30
    assert train_lib.parse_swa_start("1.0", 40) == 39
    assert train_lib.parse_swa_start("12", 40) == 12


def test_paper_models_build_with_their_sizes():
    counts = {
        name: models_lib.get(name, (32, 32, 3), 10).count_params()
        for name in ("vgg16_bn", "preresnet164")
    }
    # Published sizes: VGG16-BN about 15M, PreResNet-164 about 1.7M weights.
    assert 14e6 < counts["vgg16_bn"] < 16e6
    assert 1.6e6 < counts["preresnet164"] < 1.8e6
    with pytest.raises(ValueError, match="Unknown model"):
        models_lib.get("resnet9000", (32, 32, 3), 10)


def test_train_binary_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = run_binary(
        "examples.train", "--averaging=swa", "--epochs=2", "--swa_start=0.5",
        "--batch_size=256", f"--output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SWA: average" in result.stdout
    assert (out / "metrics.json").exists() and (out / "curves.png").exists()


def test_train_binary_rejects_bad_flag():
    result = run_binary("examples.train", "--epochs=3", "--swa_start=7")
    assert result.returncode != 0
    assert "--swa_start" in result.stderr


def test_benchmark_binary_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run_binary(
        "examples.benchmark", "--small", "--rounds=1", "--steps=2", f"--output={out}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SWA non-snapshot update / bare update" in result.stdout
    report = json.loads(out.read_text())
    assert report["weights"] > 0 and len(report["checks"]) >= 6
    assert all(seconds > 0 for seconds in report["seconds"].values())
