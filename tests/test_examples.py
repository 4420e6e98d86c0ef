"""The example binaries: end to end on tiny settings (no download), their
one-line errors, and the pieces of their report (schedules, seed summary,
calibration, the post-hoc EMA sweep).

The error tests start the binaries as subprocesses; they check flags and
data before importing Keras, so each takes about a second.
"""

import gzip
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from examples import data as data_lib
from examples import models as models_lib
from examples import plots
from examples import recipes
from examples import report
from examples import runs
from examples import scoring
from examples import stats
from examples import train as train_lib
from examples import train_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(tmp_path, **overrides):
    """Every setting of the binary, tiny; with `train_flags.DEFAULTS` for the
    ones a caller may leave out."""
    base = {**train_flags.DEFAULTS, **dict(
        dataset="digits", data_dir=None, download=False, model="small_cnn",
        epochs=3, batch_size=128, schedule="cosine", lr=0.05, momentum=0.9,
        weight_decay=5e-4, swa_start="1", swa_lr=0.01, ema_decay=0.9,
        ema_warmup=True, averaging="compare", seeds=[0],
        output_dir=str(tmp_path / "out"), verbose=0, swag_samples=3,
    )}
    base.update(overrides)
    return base


def run_binary(command, *args, cwd=ROOT, timeout=300):
    """Runs `python -m <module>` (a dotted name) or `python <file>`."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    prefix = ["-m", command] if not command.endswith(".py") else [command]
    return subprocess.run(
        [sys.executable, *prefix, *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=timeout,
    )


def write_idx(path, array):
    header = b"\x00\x00\x08" + bytes([array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist(folder, n_train=40, n_test=12):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, size=(n_train, 28, 28)),
        "y_train": rng.integers(0, 10, size=(n_train,)),
        "x_test": rng.integers(0, 256, size=(n_test, 28, 28)),
        "y_test": rng.integers(0, 10, size=(n_test,)),
    }
    for key, name in data_lib.IDX_FILES.items():
        write_idx(folder / name, arrays[key])
    return arrays


# --- End to end ----------------------------------------------------------------


def numpy_scores(probabilities, labels, num_bins=15):
    """Accuracy, NLL and expected calibration error, by hand: the
    reference of the binary's columns."""
    probabilities = probabilities.astype("float64")
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    ece = 0.0
    for b in range(num_bins):
        lower, upper = b / num_bins, (b + 1) / num_bins
        in_bin = (confidence > lower) & (confidence <= upper)
        if b == 0:
            in_bin |= confidence == 0
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    nll = -np.log(probabilities[np.arange(len(labels)), labels]).mean()
    return {"accuracy": correct.mean(), "nll": nll, "ece": ece}


def assert_scores_match_predictions(out_dir, saved):
    """Every row's accuracy, NLL and ECE in metrics.json, per seed, equal
    the NumPy ones of the probabilities in predictions.npz."""
    predictions = np.load(out_dir / "predictions.npz")
    labels = predictions["labels"]
    for seed in saved["seeds"]:
        final = saved["per_seed"][str(seed)]["final"]
        for row, values in final.items():
            probabilities = predictions[f"{row}_seed{seed}"]
            assert probabilities.shape == (len(labels), 10)
            np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
            expected = numpy_scores(probabilities, labels)
            assert values["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9), row
            assert values["nll"] == pytest.approx(expected["nll"], rel=1e-6), row
            assert values["ece"] == pytest.approx(expected["ece"], abs=1e-5), row
    return predictions


def assert_png(path):
    png = path.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_compare_on_digits_writes_table_sentence_metrics_and_curves(tmp_path, capsys):
    # Two epochs, SWA from the last: the average is the final iterate, so
    # with every row's BatchNorm recomputed the two rows must agree, while
    # the running statistics of a 2-epoch run are far off. One snapshot:
    # the SWAG posterior has no spread, so SWAG-BMA is the SWA model.
    metrics = train_lib.train(config(tmp_path, epochs=2, batch_size=256))

    out = capsys.readouterr().out
    for row in ("sgd", "swa_iterate", "swa", "swag", "ema"):
        assert scoring.LABELS[row] in out
    assert "One seed, so no interval" in out and "recomputed on the training set" in out
    assert "test accuracy |" in out and "test NLL |" in out and "test ECE |" in out
    assert "keras_swa.predict_bma:" in out and "s per sample (3 samples" in out
    with open(tmp_path / "out" / "metrics.json") as f:
        saved = json.load(f)
    assert saved["seeds"] == [0] and saved["swa_start_epoch"] == 1
    assert set(saved["final"]) == {"sgd", "swa_iterate", "swa", "swag", "ema"}
    for row in saved["final"].values():
        assert set(row) == {f"{m}{suffix}" for m in ("accuracy", "nll", "ece")
                            for suffix in ("", "_std", "_per_seed")}
    predictions = assert_scores_match_predictions(tmp_path / "out", saved)
    np.testing.assert_allclose(predictions["swag_seed0"], predictions["swa_seed0"], atol=1e-5)
    swag = saved["per_seed"]["0"]["swag"]
    assert swag["samples"] == 3 and swag["n_averaged"] == 1 and swag["rank"] == 1
    assert swag["bma_seconds_per_sample"] == pytest.approx(swag["bma_seconds"] / 3)
    assert saved["conclusion"] == metrics["conclusion"]
    per_seed = saved["per_seed"]["0"]
    assert set(per_seed["runs"]) == {"sgd", "swa"}
    assert len(per_seed["runs"]["sgd"]["history"]["val_accuracy"]) == 2
    assert len(per_seed["runs"]["swa"]["history"]["val_swa_accuracy"]) == 1
    final = saved["final"]
    assert final["swa"]["accuracy"] == pytest.approx(final["swa_iterate"]["accuracy"], abs=0.01)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in final.values())
    assert set(per_seed["running_bn"]) == {"sgd", "swa_iterate"}
    assert_png(tmp_path / "out" / "curves.png")
    assert_png(tmp_path / "out" / "calibration.png")
    assert not (tmp_path / "out" / "posthoc_ema.png").exists()


def test_compared_runs_see_the_same_data_order(tmp_path):
    # Issue 24: the plain run and the SWA run of `compare` must see the same
    # batches in the same order. Here they follow the same learning rates
    # (2 epochs, SWA from epoch 1 at 0.025, the plain cosine's second
    # epoch), from the same initial weights: with the same data order the
    # SWA run's final iterate is the plain run's final model.
    train_lib.train(config(tmp_path, epochs=2, batch_size=64, lr=0.05, swa_start="1",
                           swa_lr=0.025, swag_samples=1, swag_bn_batches=1))
    predictions = np.load(tmp_path / "out" / "predictions.npz")
    np.testing.assert_allclose(predictions["swa_iterate_seed0"], predictions["sgd_seed0"],
                               atol=1e-4)


def test_training_order_is_a_function_of_seed_and_epoch():
    # Two training pipelines of one seed give the same batches pass by
    # pass (each pass a permutation of the examples, the passes in
    # different orders); another seed another order. With augmentation
    # (CIFAR) the crops and flips are the same too.
    rng = np.random.default_rng(0)
    n = 10
    x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
    arrays = data_lib.Arrays(x, np.arange(n), x[:2], np.arange(2), 10)

    def passes(name, seed, count=3):
        pipeline = data_lib.pipelines(name, arrays, batch_size=4, seed=seed).train_pipeline()
        return [[(bx.numpy(), by.numpy()) for bx, by in pipeline] for _ in range(count)]

    first, second = passes("digits", 0), passes("digits", 0)
    orders = [np.concatenate([by for _, by in epoch]) for epoch in first]
    for k, order in enumerate(orders):
        assert [len(by) for _, by in first[k]] == [4, 4, 2]
        np.testing.assert_array_equal(order, data_lib.epoch_order(0, k, n))
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
        for (ax, ay), (bx, by) in zip(first[k], second[k]):
            np.testing.assert_array_equal(ay, by)
            np.testing.assert_array_equal(ax, x[ay])  # not augmented
    assert len({tuple(o) for o in orders}) == 3
    other = np.concatenate([by for _, by in passes("digits", 1, 1)[0]])
    assert not np.array_equal(other, orders[0])
    augmented, again = passes("cifar10", 0, 2), passes("cifar10", 0, 2)
    for epoch, epoch_again in zip(augmented, again):
        for (ax, ay), (bx, by) in zip(epoch, epoch_again):
            np.testing.assert_array_equal(ay, by)
            np.testing.assert_array_equal(ax, bx)
            assert ax.shape == (len(ay), 32, 32, 3) and not np.array_equal(ax, x[ay])


def test_trajectory_mode_averages_one_run_and_gives_paired_intervals(tmp_path, capsys):
    # The demo's mode: one run per seed carries EMA, SWA and SWAG at a
    # constant rate, on labels with 20% noise; two seeds give intervals,
    # checked against NumPy scores of predictions.npz (t(0.975, 1) = 12.7062).
    metrics = train_lib.train(config(
        tmp_path, averaging="trajectory", schedule="constant", lr=0.05, label_noise=0.2,
        epochs=3, swa_start="1", batch_size=128, seeds=[0, 1], swag_samples=2,
        swag_bn_batches=2,
    ))
    out = capsys.readouterr().out
    assert set(metrics["final"]) == {"sgd", "swa", "swag", "ema"}
    assert "SGD + EMA + SWAG callback, one trajectory" in out
    assert "20% of the training labels replaced by another class" in out
    assert "Paired difference to SGD iterate (same seed" in out
    with open(tmp_path / "out" / "metrics.json") as f:
        saved = json.load(f)
    for seed in ("0",):
        per_seed = saved["per_seed"][seed]
        assert set(per_seed["runs"]) == {"sgd"}  # one run
        history = per_seed["runs"]["sgd"]["history"]
        # The SWA callback leaves the constant rate alone.
        assert history["learning_rate"] == pytest.approx([0.05] * 3)
        assert len(history["val_swa_accuracy"]) == 2  # epochs 1 and 2
        assert per_seed["swag"]["n_averaged"] == 2
        assert per_seed["noisy_labels"] == round(0.2 * 1437)
    predictions = assert_scores_match_predictions(tmp_path / "out", saved)
    labels = predictions["labels"]
    assert saved["baseline"] == "sgd" and set(saved["differences"]) == {"swa", "swag", "ema"}
    for row, per_metric in saved["differences"].items():
        for metric, difference in per_metric.items():
            d = [numpy_scores(predictions[f"{row}_seed{s}"], labels)[metric]
                 - numpy_scores(predictions[f"sgd_seed{s}"], labels)[metric] for s in (0, 1)]
            half = 12.7062 * np.std(d, ddof=1) / np.sqrt(2)
            assert difference["mean"] == pytest.approx(np.mean(d), abs=1e-5)
            assert difference["low"] == pytest.approx(np.mean(d) - half, abs=1e-4)
            assert difference["high"] == pytest.approx(np.mean(d) + half, abs=1e-4)
            assert difference["verdict"] in ("better", "worse", "no significant difference")
            assert f"| {difference['verdict']} |" in out
    assert saved["conclusion"].startswith("Over 2 seeds, against SGD iterate (paired")
    assert_png(tmp_path / "out" / "curves.png")


def needs_keras_schedule_free(test):
    """Skips `test` on a Keras without `ScheduleFreeAdamW` (new in 3.15)."""
    import keras

    return pytest.mark.skipif(
        not hasattr(keras.optimizers, "ScheduleFreeAdamW"),
        reason=f"Keras {keras.__version__} has no ScheduleFreeAdamW")(test)


def tiny_digits(monkeypatch, n_train=96, n_test=48):
    """`data.read` gives the first digits only: a run takes a second."""
    digits = data_lib.read("digits")
    tiny = data_lib.Arrays(digits.x_train[:n_train], digits.y_train[:n_train],
                           digits.x_test[:n_test], digits.y_test[:n_test], digits.num_classes)
    monkeypatch.setattr(data_lib, "read", lambda *args: tiny)


@needs_keras_schedule_free
@pytest.mark.filterwarnings("ignore:On this backend Keras' ScheduleFreeAdamW")
def test_schedule_free_mode_reports_y_and_x_of_each_optimizer(tmp_path, monkeypatch, capsys):
    # Issue 23: plain SGD, ScheduleFree(SGD), ScheduleFree(AdamW) and Keras'
    # ScheduleFreeAdamW, each at y (the model as Keras leaves it) and at x
    # (its average): x differs from y, and the x - y differences hold the
    # NumPy scores of predictions.npz. Keras' x is its y where its update
    # makes y the average (keras_swa's probe says where).
    from keras_swa import schedule_free

    tiny_digits(monkeypatch)
    metrics = train_lib.train(config(tmp_path, averaging="schedule_free", epochs=2,
                                     batch_size=32, seeds=[0]))
    out = capsys.readouterr().out
    pairs = report.SCHEDULE_FREE_ROWS.values()
    assert set(metrics["final"]) == {"sgd", *(row for pair in pairs for row in pair)}
    assert "ScheduleFree(SGD), small_cnn on digits, 2 epochs, no schedule (1-epoch warmup)" in out
    assert "ScheduleFree(SGD) at 0.5 (no momentum)" in out
    with open(tmp_path / "out" / "metrics.json") as f:
        saved = json.load(f)
    predictions = assert_scores_match_predictions(tmp_path / "out", saved)
    labels = predictions["labels"]
    x_is_y = schedule_free.keras_update_rule() == "x_from_new_z"
    for seed in ("0",):
        per_seed = saved["per_seed"][seed]
        assert set(per_seed["runs"]) == {"sgd", "sf", "sf_adamw", "keras_sf"}
        assert per_seed["sf_x_is_y"] is False and per_seed["sf_adamw_x_is_y"] is False
        assert per_seed["keras_sf_x_is_y"] is x_is_y
        for y, x in pairs:
            same = np.array_equal(predictions[f"{x}_seed{seed}"], predictions[f"{y}_seed{seed}"])
            assert same is (x == "keras_sf_x" and x_is_y), x
    assert ("Note: Keras ScheduleFreeAdamW: x is y." in out) is x_is_y
    for y, x in pairs:
        for metric, difference in saved["schedule_free_x_vs_y"][x].items():
            d = [numpy_scores(predictions[f"{x}_seed{s}"], labels)[metric]
                 - numpy_scores(predictions[f"{y}_seed{s}"], labels)[metric] for s in (0,)]
            assert difference["mean"] == pytest.approx(np.mean(d), abs=1e-5)


def test_report_holds_each_schedule_free_x_against_its_y():
    # Over three seeds, x - y per optimizer (not against the SGD iterate):
    # ScheduleFree(SGD)'s x is 1, 2, 3 points above its y, t(0.975, 2) =
    # 4.302653; rows without their y, and Keras' equal rows, by hand.
    summary = report.summarize(finals({
        "sgd": [0.80, 0.80, 0.80], "sf_y": [0.90, 0.90, 0.90], "sf_x": [0.91, 0.92, 0.93],
        "keras_sf_y": [0.85, 0.86, 0.87], "keras_sf_x": [0.85, 0.86, 0.87],
        "sf_adamw_x": [0.9, 0.9, 0.9],
    }))
    diffs = report.x_against_y(summary)
    assert list(diffs) == ["sf_x", "keras_sf_x"]
    half = 4.302653 * 0.01 / math.sqrt(3)
    sf = diffs["sf_x"]["accuracy"]
    assert sf["mean"] == pytest.approx(0.02)
    assert (sf["low"], sf["high"]) == pytest.approx((0.02 - half, 0.02 + half), rel=1e-5)
    assert sf["verdict"] == "no significant difference"  # the interval holds 0
    assert diffs["sf_x"]["nll"]["mean"] == pytest.approx(-0.02)  # NLL = 1 - accuracy
    assert diffs["keras_sf_x"]["ece"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 3,
                                          "verdict": "no significant difference"}
    text = report.format_differences(summary, diffs,
                                     against="of each schedule-free x to its y (same run)")
    assert text.startswith("Paired difference of each schedule-free x to its y (same run), "
                           "mean and 95% t-interval over 3 seeds; accuracy in points:")
    assert "| ScheduleFree(SGD): x       | accuracy |      +2.00 |" in text
    assert "Keras ScheduleFreeAdamW: x" in text and "SGD iterate" not in text


@needs_keras_schedule_free
def test_schedule_free_optimizers_warm_up_then_hold_the_rate():
    import keras

    import keras_swa

    settings = {"sf_lr": 0.4, "sf_adamw_lr": 0.003, "sf_momentum": 0.8, "weight_decay": 1e-3,
                "sf_warmup_epochs": 2}
    sgd = runs.schedule_free_optimizer(settings, "sgd", steps_per_epoch=5)
    adamw = runs.schedule_free_optimizer(settings, "adamw", steps_per_epoch=5)
    for optimizer, inner, lr in ((sgd, keras.optimizers.SGD, 0.4),
                                 (adamw, keras.optimizers.AdamW, 0.003)):
        assert isinstance(optimizer, keras_swa.ScheduleFree) and optimizer.momentum == 0.8
        # isinstance: on PyTorch Keras makes a subclass of its own.
        assert isinstance(optimizer.inner_optimizer, inner)
        assert optimizer.inner_optimizer.weight_decay == 1e-3
        rate = optimizer.inner_optimizer._learning_rate  # the schedule itself
        # Linear from 0 over 2 epochs of 5 updates, then constant.
        for step, expected in ((0, 0.0), (5, lr / 2), (10, lr), (100, lr)):
            assert float(rate(step)) == pytest.approx(expected), (inner, step)
    assert sgd.inner_optimizer.momentum == 0.0 and adamw.inner_optimizer.beta_1 == 0.0
    native = runs.schedule_free_optimizer(settings, "keras", steps_per_epoch=5)
    assert isinstance(native, keras.optimizers.ScheduleFreeAdamW)
    assert (native.beta_1, native.warmup_steps, native.weight_decay) == (0.8, 10, 1e-3)
    assert float(native.learning_rate) == pytest.approx(0.003)
    constant = runs.schedule_free_optimizer({**settings, "sf_warmup_epochs": 0}, "sgd", 5)
    assert float(constant.inner_optimizer.learning_rate) == pytest.approx(0.4)


def test_schedule_free_mode_needs_keras_3_15(tmp_path, monkeypatch):
    monkeypatch.setattr(train_flags.metadata, "version", lambda name: "3.14.2")
    with pytest.raises(ValueError, match=r"needs Keras >= 3.15 .* found 3.14.2"):
        train_flags.validate(config(tmp_path, averaging="schedule_free"))
    train_flags.validate(config(tmp_path, averaging="trajectory"))  # the others do not


def test_label_noise_replaces_a_share_of_the_training_labels():
    arrays = data_lib.read("digits")
    original = arrays.y_train.copy()
    noisy, changed = data_lib.with_label_noise(arrays, 0.2, seed=3)
    assert len(changed) == round(0.2 * len(original))
    # Exactly the chosen labels differ: each moved to another class.
    np.testing.assert_array_equal(np.flatnonzero(noisy.y_train != original), changed)
    np.testing.assert_array_equal(arrays.y_train, original)  # a copy
    np.testing.assert_array_equal(noisy.y_test, arrays.y_test)  # test labels clean
    np.testing.assert_array_equal(noisy.x_train, arrays.x_train)
    # Every wrong class is drawn: the 287 new labels spread over all ten.
    assert len(np.unique(noisy.y_train[changed])) == 10
    again, _ = data_lib.with_label_noise(arrays, 0.2, seed=3)
    np.testing.assert_array_equal(again.y_train, noisy.y_train)
    other, other_changed = data_lib.with_label_noise(arrays, 0.2, seed=4)
    assert not np.array_equal(other_changed, changed)
    assert len(data_lib.with_label_noise(arrays, 0.0, seed=3)[1]) == 0


def test_coupled_l2_is_torch_s_weight_decay():
    # Two full-batch SGD steps (momentum 0.9) of a linear model under MSE,
    # with the coupled L2 of the paper recipe, against NumPy's torch.optim.
    # SGD(weight_decay=l2): g = dL/dw + l2 * w; buf = 0.9 * buf + g; w -= lr * buf.
    import keras

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    kernel = rng.normal(size=(3, 2)).astype("float32")
    bias = rng.normal(size=(2,)).astype("float32")
    lr, l2 = 0.1, 0.05

    def keras_steps(l2):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.set_weights([kernel, bias])
        if l2:
            runs.add_coupled_l2(model, l2)
        model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9), loss="mse")
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
        return model.get_weights()

    def numpy_steps(l2):
        w, b = kernel.astype("float64"), bias.astype("float64")
        buffers = None
        for _ in range(2):
            error = 2 * (x @ w + b - y) / y.size
            grads = [x.T @ error + l2 * w, error.sum(axis=0) + l2 * b]
            buffers = grads if buffers is None else [0.9 * m + g for m, g in zip(buffers, grads)]
            w, b = w - lr * buffers[0], b - lr * buffers[1]
        return [w, b]

    for value in (0.0, l2):
        for got, expected in zip(keras_steps(value), numpy_steps(value)):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_recipes_set_their_values_but_not_the_flags_given():
    cfg = {**train_flags.DEFAULTS, "recipe": "paper", "epochs": 40, "lr": 0.1, "l2": 0.0}
    out = recipes.apply_recipe(cfg, given=["lr"])
    assert out["lr"] == 0.1  # given: kept
    assert out["epochs"] == 12 and out["l2"] == 5e-4 and out["weight_decay"] == 0.0
    assert out["swa_anneal_epochs"] == 1 and out["swa_lr"] == 0.01 and out["swa_start"] == "0.75"
    assert cfg["epochs"] == 40  # a new dict
    assert recipes.apply_recipe({**cfg, "recipe": None}, ()) == {**cfg, "recipe": None}
    with pytest.raises(ValueError, match="--recipe must be one of demo, paper"):
        recipes.apply_recipe({**cfg, "recipe": "nope"}, ())
    for name, preset in recipes.RECIPES.items():
        assert set(preset) <= set(train_flags.CONFIG_KEYS), name
        # A recipe sets only flags its mode uses (else its own flags are refused).
        for flag in preset:
            if flag in train_flags.MODE_FLAGS:
                assert preset["averaging"] in train_flags.MODE_FLAGS[flag], (name, flag)
    assert recipes.RECIPES["demo"]["averaging"] == "trajectory"


def test_paper_recipe_on_fashion_mnist_idx_files(tmp_path):
    # One command, on generated IDX files, shortened to 4 epochs (SWA from
    # epoch 2). The plain run follows the cosine over the 4 epochs; the SWA
    # run the same cosine until epoch 2, whose rate the SWA callback keeps
    # for that epoch before reaching 0.01 (a one-epoch anneal, as SWALR).
    folder = tmp_path / "fashion"
    folder.mkdir()
    write_mnist(folder, n_train=64, n_test=16)
    out = tmp_path / "out"
    result = run_binary(
        "examples.train", "--recipe=paper", "--dataset=fashion_mnist", f"--data_dir={folder}",
        "--epochs=4", "--swa_start=2", "--batch_size=32", "--swag_samples=2",
        "--swag_bn_batches=1", "--verbose=0", f"--output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--recipe=paper: small_cnn on fashion_mnist (16 test images)" in result.stdout
    assert "coupled L2 0.0005" in result.stdout
    assert "the callback anneals to 0.01 over 1 epoch(s)" in result.stdout
    saved = json.loads((out / "metrics.json").read_text())
    config = saved["config"]
    assert (config["l2"], config["weight_decay"], config["momentum"]) == (5e-4, 0.0, 0.9)
    assert (config["schedule"], config["swa_lr"], config["swa_anneal_epochs"]) == ("cosine", 0.01, 1)
    assert (config["epochs"], config["batch_size"], config["lr"]) == (4, 32, 0.05)
    assert set(saved["final"]) == {"sgd", "swa_iterate", "swa", "swag", "ema"}
    cosine = [0.05 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    runs_ = saved["per_seed"]["0"]["runs"]
    assert runs_["sgd"]["history"]["learning_rate"] == pytest.approx(cosine, rel=1e-6)
    assert runs_["swa"]["history"]["learning_rate"] == pytest.approx(cosine[:3] + [0.01], rel=1e-6)
    for name in ("curves.png", "calibration.png"):
        assert_png(out / name)


def test_swag_mode_samples_a_posterior_with_spread(tmp_path, capsys):
    # Three epochs, SWA from epoch 1: two snapshots, so the samples differ
    # from the mean and SWAG-BMA from the SWA average.
    metrics = train_lib.train(config(tmp_path, averaging="swag", epochs=3, batch_size=256,
                                      swag_samples=4, swag_bn_batches=2))
    assert set(metrics["final"]) == {"swa_iterate", "swa", "swag"}
    out = capsys.readouterr().out
    assert "SGD + SWAG callback" in out and "SWAG-BMA: the mean probabilities of 4" in out
    with open(tmp_path / "out" / "metrics.json") as f:
        saved = json.load(f)
    swag = saved["per_seed"]["0"]["swag"]
    assert swag["n_averaged"] == 2 and swag["rank"] == 2 and swag["samples"] == 4
    predictions = assert_scores_match_predictions(tmp_path / "out", saved)
    assert np.abs(predictions["swag_seed0"] - predictions["swa_seed0"]).max() > 1e-3
    assert saved["swag_bma_timing"].startswith("keras_swa.predict_bma:")
    for name in ("curves.png", "calibration.png"):
        assert_png(tmp_path / "out" / name)


def test_posthoc_ema_mode_sweeps_sigma_rel_after_training(tmp_path, capsys):
    import keras_swa

    # 2 epochs of 12 batches: 24 updates, 6 snapshots every 4 updates.
    cfg = config(tmp_path, averaging="posthoc_ema", epochs=2, batch_size=128,
                 ema_sigma_rels=["0.05", "0.10"], ema_sweep=["0.05", "0.08", "0.10"],
                 ema_snapshots=6)
    metrics = train_lib.train(cfg)
    out = capsys.readouterr().out
    assert "SGD + PostHocEMA" in out and "6 snapshots every 4 of its 24 updates" in out
    assert "EMA sigma_rel=0.08 " in out and "EMA sigma_rel=0.05 (tracked)" in out
    assert set(metrics["final"]) == {"sgd"}
    out_dir = tmp_path / "out"
    snapshot_dir = out_dir / "ema_snapshots" / "seed_0"
    assert sorted(os.listdir(snapshot_dir)) == [f"ema-{s:010d}.npz" for s in range(4, 25, 4)]
    with open(out_dir / "metrics.json") as f:
        saved = json.load(f)
    assert_scores_match_predictions(out_dir, saved)
    sweep = saved["per_seed"]["0"]["posthoc_ema"]["sweep"]
    assert [row["sigma_rel"] for row in sweep] == [0.05, 0.08, 0.10]
    assert set(saved["posthoc_ema"]["sweep"]) == {"ema@0.05", "ema@0.08", "ema@0.1"}
    assert saved["posthoc_ema"]["sweep"]["ema@0.08"]["nll"] == sweep[1]["nll"]
    for name in ("curves.png", "calibration.png", "posthoc_ema.png"):
        assert_png(out_dir / name)

    # The reference: the library's reconstruction of sigma_rel=0.08 in a
    # fresh model, BatchNorm recomputed, scored by NumPy.
    dataset = data_lib.pipelines("digits", data_lib.read("digits"), 128, seed=0)
    model = models_lib.get("small_cnn", dataset.input_shape, dataset.num_classes)
    keras_swa.reconstruct_ema(model, str(snapshot_dir), 0.08, bn_data=dataset.train_eval,
                              verbose=0)
    logits = model.predict(dataset.test, verbose=0).astype("float64")
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    expected = numpy_scores(probabilities, np.load(out_dir / "predictions.npz")["labels"])
    assert sweep[1]["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert sweep[1]["nll"] == pytest.approx(expected["nll"], rel=1e-4)
    assert sweep[1]["ece"] == pytest.approx(expected["ece"], abs=1e-4)


def test_train_binary_end_to_end_from_another_folder(tmp_path):
    # The file itself, from outside the checkout, with a relative
    # --output_dir: it finds its package and writes where it was started.
    result = run_binary(
        os.path.join(ROOT, "examples", "train.py"), "--averaging=sgd", "--epochs=1",
        "--batch_size=256", "--schedule=paper", "--output_dir=run", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SGD iterate" in result.stdout and "paper schedule" in result.stdout
    assert (tmp_path / "run" / "metrics.json").exists()
    assert (tmp_path / "run" / "curves.png").exists()


def test_tfds_dataset_through_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        # Mock data counts as not prepared: it is "downloaded" instead.
        with pytest.raises(data_lib.DataError, match="--download"):
            data_lib.check("cifar10")
        dataset = data_lib.load("cifar10", batch_size=8, download=True)
        x, y = next(iter(dataset.train_pipeline()))
        assert x.shape == (8, 32, 32, 3) and x.dtype == "float32"
        assert dataset.num_classes == 10 and dataset.input_shape == (32, 32, 3)
        # Two seeds: the table is mean ± standard deviation.
        metrics = train_lib.train(
            config(tmp_path, dataset="cifar10", download=True, averaging="swa",
                   epochs=2, batch_size=8, seeds=[0, 1])
        )
    assert set(metrics["final"]) == {"swa_iterate", "swa"}
    assert metrics["conclusion"].startswith("Over 2 seeds") and "SWA: final iterate" in metrics["conclusion"]
    with open(tmp_path / "out" / "metrics.json") as f:
        saved = json.load(f)
    assert saved["seeds"] == [0, 1] and set(saved["per_seed"]) == {"0", "1"}
    for row in saved["final"].values():
        assert len(row["accuracy_per_seed"]) == 2 and row["accuracy_std"] is not None
        assert row["accuracy"] == pytest.approx(np.mean(row["accuracy_per_seed"]))


def test_mnist_from_idx_files_in_data_dir(tmp_path):
    arrays = write_mnist(tmp_path)
    np.testing.assert_array_equal(
        data_lib.read_idx(tmp_path / data_lib.IDX_FILES["x_test"]), arrays["x_test"]
    )
    assert data_lib.check("mnist", str(tmp_path)) == "idx"
    dataset = data_lib.load("mnist", batch_size=16, data_dir=str(tmp_path))
    assert dataset.train_size == 40 and dataset.input_shape == (28, 28, 1)
    x, y = next(iter(dataset.test))
    np.testing.assert_allclose(x.numpy()[..., 0], arrays["x_test"][:12] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y.numpy(), arrays["y_test"])

    # The EMA run reports its raw weights (plain SGD) and its average.
    metrics = train_lib.train(
        config(tmp_path, dataset="mnist", data_dir=str(tmp_path), averaging="ema",
               swa_start="0", epochs=1, batch_size=16)
    )
    assert set(metrics["final"]) == {"sgd", "ema"}


def test_benchmark_binary_writes_json(tmp_path):
    import keras

    # On TensorFlow also update_bn data-parallel on two replicas (the CPU
    # split into two logical devices), in the same run for time.
    tensorflow = keras.backend.backend() == "tensorflow"
    replicas = ["--bn_batches=2", "--bn_replicas=2"] if tensorflow else []
    out = tmp_path / "bench.json"
    result = run_binary(
        "examples.benchmark", "--small", "--rounds=1", "--steps=2", *replicas,
        f"--output={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SWA non-snapshot update / bare update" in result.stdout
    assert "minimum over 1 interleaved rounds" in result.stdout
    assert "Copy bandwidth: " in result.stdout
    report = json.loads(out.read_text())
    assert report["weights"] > 0 and len(report["checks"]) >= 6
    assert report["statistic"] == "minimum over interleaved rounds"
    assert set(report["median_seconds"]) == set(report["seconds"])
    assert all(seconds > 0 for seconds in report["seconds"].values())
    # The copy bandwidth of the same run, and the floor DESIGN.md counts in it.
    assert report["weight_bytes"] == 4 * report["weights"]  # float32
    assert report["copy_bytes"] == 2 * report["weight_bytes"]  # read + written
    assert report["seconds"]["copy/weights_sized_buffer"] > 0
    assert report["copy_bandwidth_gb_per_s"] == pytest.approx(
        report["copy_bytes"] / report["seconds"]["copy/weights_sized_buffer"] / 1e9
    )
    assert report["bandwidth_floor_seconds"] == pytest.approx(
        3 * report["weight_bytes"] / (report["copy_bandwidth_gb_per_s"] * 1e9)
    )
    # The measures and targets of DESIGN.md "## Measures".
    targets = {c["measure"]: c["target"] for c in report["checks"]}
    assert targets["fit step: SWA (no snapshot) / bare"] == 1.01
    assert targets["fit step: SWA every 10 / bare"] == 1.02
    floor = "SWA snapshot extra / bandwidth floor (3 x weight bytes / copy bandwidth)"
    assert targets[floor] == 1.3
    assert targets["SWA snapshot extra / raw pass"] == 1.0
    assert "SWA snapshot extra / floor pass" not in targets
    for name in (floor, "SWA snapshot extra / raw pass"):
        assert name in result.stdout
    seconds = report["seconds"]
    extra = seconds["update/swa_every_step"] - seconds["update/bare"]
    ratios = {c["measure"]: c["ratio"] for c in report["checks"]}
    assert ratios[floor] == pytest.approx(extra / report["bandwidth_floor_seconds"])
    assert ratios["SWA snapshot extra / raw pass"] == pytest.approx(
        extra / seconds["update/raw_pass"]
    )
    # A target missed is reported as missed.
    for check in report["checks"]:
        if check["target"] is not None:
            assert check["ok"] == (check["ratio"] <= check["target"])
    if tensorflow:
        # The replicas' row, and a measure without target.
        assert report["seconds"]["bn/update_bn_2_replicas (2 batches)"] > 0
        (check,) = [
            c for c in report["checks"] if c["measure"].startswith("update_bn: 2 replicas")
        ]
        assert check["ratio"] == pytest.approx(
            report["seconds"]["bn/update_bn_2_replicas (2 batches)"]
            / report["seconds"]["bn/update_bn (2 batches)"]
        )
        assert check["target"] is None and check["ok"] is None


def test_benchmark_replicas_need_tensorflow():
    # Other backends have no tf.distribute: a one-line error, before any
    # timing. (On TensorFlow the JSON test above runs the replicas' row.)
    import keras

    if keras.backend.backend() == "tensorflow":
        pytest.skip("TensorFlow runs --bn_replicas: see test_benchmark_binary_writes_json.")
    result = run_binary("examples.benchmark", "--small", "--bn_replicas=2")
    assert_one_line_error(result, "--bn_replicas=2 needs the TensorFlow backend")


# --- One-line errors -----------------------------------------------------------


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.args, result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.args
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, (result.args, result.stderr)
    assert lines[0].split(": error: ")[0] in ("examples.train", "examples.benchmark")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.stdout == ""  # nothing trained or timed
    return lines[0]


def run_all(cases):
    """Runs `(command, args, cwd)` cases side by side (each is mostly
    interpreter start-up); returns their results in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(run_binary, command, *args, cwd=cwd) for command, args, cwd in cases]
        return [f.result() for f in futures]


def test_train_bad_flags_missing_data_and_output_dir_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    partial = tmp_path / "partial"
    partial.mkdir()
    write_mnist(partial)
    os.remove(partial / data_lib.IDX_FILES["y_test"])
    blocker = tmp_path / "a_file"  # under a regular file no folder can be made
    blocker.write_text("")
    train_file = os.path.join(ROOT, "examples", "train.py")
    cases = [
        (["--epochs=-1"], ["--epochs must be an integer >= 1, got -1"]),
        (["--epochs=abc"], ["--epochs=abc", "--helpshort"]),
        (["--batch_size=0"], ["--batch_size"]),
        (["--epochs=3", "--swa_start=7"], ["--swa_start", "[0, 2]"]),
        (["--seeds=0,0"], ["--seeds", "distinct"]),
        (["--seeds=0,one"], ["--seeds"]),
        (["--schedule=linear"], ["--schedule=linear", "cosine|paper"]),
        (["--verbose=3"], ["--verbose"]),
        (["--averaging=bma"], ["--averaging", "posthoc_ema"]),
        (["--recipe=fast"], ["--recipe=fast", "demo|paper"]),
        (["--label_noise=1"], ["--label_noise must be a float in [0, 1), got 1.0"]),
        (["--l2=-0.1"], ["--l2 must be a float >= 0, got -0.1"]),
        (["--swa_anneal_epochs=-1"], ["--swa_anneal_epochs must be an integer >= 0"]),
        # A recipe's mode refuses the flags it does not use, and says who chose it.
        (["--recipe=demo", "--swa_lr=0.02"],
         ["--swa_lr is used only with --averaging=compare, swa or swag, not "
          "--averaging=trajectory (set by --recipe=demo)"]),
        (["--recipe=demo", "--epochs=0"], ["--epochs must be an integer >= 1, got 0"]),
        (["--swag_samples=0"], ["--swag_samples must be an integer >= 1, got 0"]),
        (["--swag_scale=-0.5"], ["--swag_scale must be a float >= 0, got -0.5"]),
        (["--swag_rank=-1"], ["--swag_rank must be an integer >= 0, got -1"]),
        (["--swag_bn_batches=0"], ["--swag_bn_batches must be an integer >= 1"]),
        (["--averaging=posthoc_ema", "--ema_snapshots=0"],
         ["--ema_snapshots must be an integer >= 1, got 0"]),
        (["--averaging=posthoc_ema", "--ema_sigma_rels=0.05,0.3"],
         ["--ema_sigma_rels must be distinct floats in (0, 0.28)", "'0.05,0.3'"]),
        (["--averaging=posthoc_ema", "--ema_sigma_rels=0.05,0.05"],
         ["--ema_sigma_rels", "distinct"]),
        (["--averaging=posthoc_ema", "--ema_sweep=wide"], ["--ema_sweep must be", "'wide'"]),
        # A flag the mode does not use is refused, not ignored.
        (["--averaging=sgd", "--swag_samples=5"],
         ["--swag_samples is used only with --averaging=compare, swag or trajectory, not "
          "--averaging=sgd"]),
        (["--ema_sweep=0.1"], ["--ema_sweep is used only with --averaging=posthoc_ema"]),
        (["--no_such_flag"], ["no_such_flag"]),
        (["epochs=3"], ["unexpected arguments", "--name=value"]),
        (["--dataset=nosuchdataset"], ["--dataset=nosuchdataset", "--dataset=digits"]),
        (["--dataset=cifr10"], ["did you mean cifar10"]),
        # An empty IDX folder: the four files are named.
        (["--dataset=mnist", f"--data_dir={empty}"],
         [f"--data_dir={empty} holds neither the four IDX files",
          "train-images-idx3-ubyte.gz", "--download"]),
        # A partial one: the missing file is named.
        (["--dataset=fashion_mnist", f"--data_dir={partial}"],
         [f"--data_dir={partial} lacks t10k-labels-idx1-ubyte.gz"]),
        # A tensorflow-datasets name without its data and without --download.
        (["--dataset=cifar10", f"--data_dir={tmp_path / 'missing'}"],
         ["--dataset=cifar10: no prepared data", "--download", "tfds build cifar10"]),
        (["--dataset=mnist", f"--data_dir={train_file}"], ["is a file"]),
        (["--epochs=2", f"--output_dir={blocker / 'out'}"],
         [f"--output_dir={blocker / 'out'} cannot be created"]),
    ]
    results = run_all([("examples.train", args, ROOT) for args, _ in cases])
    for result, (_, fragments) in zip(results, cases):
        assert_one_line_error(result, *fragments)


def run_without(blocked, module, *args):
    """Runs `python -m module args` with the imports of `blocked` failing,
    as where the `examples` extra is not installed."""
    code = (
        "import runpy, sys\n"
        f"for name in {list(blocked)!r}:\n"
        "    sys.modules[name] = None  # `import name` raises ImportError\n"
        f"sys.argv = [{module!r}, *{list(args)!r}]\n"
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_binaries_without_the_examples_extra_say_what_to_install(tmp_path):
    # Issue 24: without a package of the `examples` extra the binary ends in
    # one line naming it and the install command, not a traceback, and
    # before anything runs (Matplotlib, used only for the figures, is
    # looked for first too). A valid short run otherwise.
    from concurrent.futures import ThreadPoolExecutor

    short = ["--averaging=sgd", "--epochs=1", "--batch_size=512",
             f"--output_dir={tmp_path / 'out'}"]
    cases = [((name,), "examples.train", short, package)
             for name, package in [("absl", "absl-py"), ("tensorflow", "tensorflow"),
                                   ("tensorflow_datasets", "tensorflow-datasets"),
                                   ("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")]]
    cases.append((("sklearn", "matplotlib"), "examples.train", short,
                  "scikit-learn, matplotlib are not installed"))
    cases.append((("absl",), "examples.benchmark", ["--small"], "absl-py"))
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: run_without(*case[:2], *case[2]), cases))
    for result, (_, _, _, package) in zip(results, cases):
        line = assert_one_line_error(result, package, 'pip install ".[examples]"')
        assert "the `examples` extra" in line
    assert not (tmp_path / "out").exists()


def test_benchmark_bad_flags_and_output_are_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (["--rounds=0"], ["--rounds must be an integer >= 1, got 0"]),
        (["--steps=0"], ["--steps must be an integer >= 1, got 0"]),
        (["--bn_batches=-1"], ["--bn_batches must be an integer >= 1, got -1"]),
        (["--bn_replicas=0"], ["--bn_replicas must be an integer >= 1, got 0"]),
        (["--batch_size=0"], ["--batch_size"]),
        (["--small=maybe"], ["--small"]),
        ([f"--output={blocker / 'bench.json'}"],
         [f"--output={blocker / 'bench.json'}", "cannot be created"]),
        ([f"--output={tmp_path}"], ["is a folder"]),
    ]
    results = run_all([("examples.benchmark", args, ROOT) for args, _ in cases])
    for result, (_, fragments) in zip(results, cases):
        assert_one_line_error(result, *fragments)


# A value for each flag of `train_flags.MODE_FLAGS`, none its default (a flag
# of the table without one here is a KeyError of the tests).
MODE_FLAG_VALUES = {
    "swa_start": "1", "swa_lr": "0.02", "swa_anneal_epochs": "1", "ema_decay": "0.99",
    "ema_warmup": "false",
    "swag_rank": "5", "swag_samples": "5", "swag_scale": "0.3", "swag_bn_batches": "5",
    "ema_sigma_rels": "0.05", "ema_sweep": "0.05", "ema_snapshots": "5",
    "sf_lr": "0.3", "sf_adamw_lr": "0.002", "sf_momentum": "0.8", "sf_warmup_epochs": "2",
}


def test_train_flags_of_another_mode_are_refused_not_ignored():
    # Given on the command line to a mode that does not use it, a flag is
    # refused in one line naming it, the mode and the modes that use it,
    # even with its default value (the user asked for something). Every
    # other case ends at `--epochs=0`: the mode check, which comes first,
    # let it through. (`--epochs=0` in the refused cases too: should the
    # check let one through, it fails at once instead of training.)
    refused = [
        (["--averaging=sgd", "--swa_lr=0.02"],
         ["--swa_lr is used only with --averaging=compare, swa or swag, not --averaging=sgd:"]),
        (["--averaging=ema", "--swa_start=1"],
         ["--swa_start is used only with --averaging=compare, swa, swag or trajectory, not "
          "--averaging=ema"]),
        (["--averaging=posthoc_ema", "--swa_lr=0.01"], ["--swa_lr", "not --averaging=posthoc_ema"]),
        (["--averaging=swa", "--ema_decay=0.99"],
         ["--ema_decay is used only with --averaging=compare, ema or trajectory, not "
          "--averaging=swa"]),
        (["--averaging=swag", "--noema_warmup"], ["--ema_warmup", "not --averaging=swag"]),
        (["--averaging=posthoc_ema", "--swag_scale=0.3"],
         ["--swag_scale is used only with --averaging=compare, swag or trajectory"]),
        (["--ema_snapshots=5"],  # compare, the default mode
         ["--ema_snapshots is used only with --averaging=posthoc_ema, not --averaging=compare"]),
        (["--averaging=trajectory", "--swa_anneal_epochs=1"],
         ["--swa_anneal_epochs is used only with --averaging=compare, swa or swag, not "
          "--averaging=trajectory: drop it"]),
        (["--averaging=trajectory", "--sf_lr=0.5"],
         ["--sf_lr is used only with --averaging=schedule_free, not --averaging=trajectory"]),
    ]
    epochs = "--epochs must be an integer >= 1, got 0."
    # The defaults of every mode, and every flag a mode uses, given.
    accepted = [[f"--averaging={mode}"] for mode in train_flags.AVERAGING]
    accepted += [
        [f"--averaging={mode}"] + [f"--{flag}={MODE_FLAG_VALUES[flag]}"
                                   for flag, modes in train_flags.MODE_FLAGS.items()
                                   if mode in modes]
        for mode in train_flags.AVERAGING
    ]
    cases = [(args + ["--epochs=0"], fragments) for args, fragments in refused]
    cases += [(args + ["--epochs=0"], [epochs]) for args in accepted]
    results = run_all([("examples.train", args, ROOT) for args, _ in cases])
    for result, (_, fragments) in zip(results, cases):
        assert_one_line_error(result, *fragments)


def test_swag_samples_given_with_swag_scale_0_are_refused():
    # --swag_scale=0 takes one sample, the SWA mean: a --swag_samples given
    # with it (even its default) would be ignored, so it is refused; left
    # out, the run goes on (here to the --epochs=0 error).
    cases = [
        (["--swag_samples=5", "--swag_scale=0"],
         ["--swag_samples is not used with --swag_scale=0 (one sample: the SWA mean):"]),
        (["--averaging=swag", "--swag_samples=30", "--swag_scale=0.0"],
         ["--swag_samples", "--swag_scale=0"]),
        (["--swag_scale=0"], ["--epochs must be an integer >= 1, got 0."]),
        (["--averaging=swag", "--swag_samples=5", "--swag_scale=0.1"], ["--epochs"]),
    ]
    results = run_all([("examples.train", args + ["--epochs=0"], ROOT) for args, _ in cases])
    for result, (_, fragments) in zip(results, cases):
        assert_one_line_error(result, *fragments)


def test_data_flags_the_data_does_not_need_are_refused(tmp_path):
    # Digits ships with scikit-learn: a folder or a download asked for it is
    # refused, not ignored. Nor is --download ignored where --data_dir holds
    # the IDX files, which are read instead of anything tensorflow-datasets
    # would fetch.
    write_mnist(tmp_path)
    assert data_lib.check("digits") == "digits"
    for data_dir, download, flag in [(str(tmp_path), False, f"--data_dir={tmp_path}"),
                                     (None, True, "--download")]:
        with pytest.raises(data_lib.DataError, match="needs neither") as error:
            data_lib.check("digits", data_dir, download)
        assert flag in str(error.value)
    with pytest.raises(data_lib.DataError,
                       match=f"--download is not needed: --data_dir={tmp_path} holds"):
        data_lib.check("mnist", str(tmp_path), download=True)
    assert data_lib.check("mnist", str(tmp_path)) == "idx"
    # The binary, in one line. Should a case get through, it trains one
    # short epoch and fails the assertion.
    short = ["--averaging=sgd", "--epochs=1", "--batch_size=512",
             f"--output_dir={tmp_path / 'out'}"]
    cases = [
        ([f"--data_dir={tmp_path}"],
         ["--dataset=digits ships with scikit-learn and needs neither --data_dir nor "
          f"--download: drop --data_dir={tmp_path}, or name another --dataset."]),
        (["--download"], ["--dataset=digits", "drop --download, or"]),
        (["--dataset=mnist", f"--data_dir={tmp_path}", "--download"],
         [f"--download is not needed: --data_dir={tmp_path} holds the four IDX files "
          "of mnist"]),
    ]
    results = run_all([("examples.train", args + short, ROOT) for args, _ in cases])
    for result, (_, fragments) in zip(results, cases):
        assert_one_line_error(result, *fragments)


def test_binaries_run_as_files_from_another_folder(tmp_path):
    # `python path/to/examples/train.py` finds its package from any folder
    # (`python -m examples.train` needs the checkout's root as the folder).
    results = run_all([
        (os.path.join(ROOT, "examples", "train.py"), ["--epochs=0"], tmp_path),
        (os.path.join(ROOT, "examples", "benchmark.py"), ["--rounds=0"], tmp_path),
    ])
    assert_one_line_error(results[0], "--epochs")
    assert_one_line_error(results[1], "--rounds")


def test_corrupt_idx_file_is_named(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / data_lib.IDX_FILES["x_train"]
    with gzip.open(path, "rb") as f:
        content = f.read()
    with gzip.open(path, "wb") as f:
        f.write(content[:-100])  # truncated
    with pytest.raises(data_lib.DataError, match="train-images-idx3-ubyte.gz is truncated"):
        data_lib.read("mnist", str(tmp_path))
    path.write_bytes(b"not gzip")
    with pytest.raises(data_lib.DataError, match="train-images-idx3-ubyte.gz cannot be read"):
        data_lib.read("mnist", str(tmp_path))


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
        ({"seeds": []}, "--seeds"),
        ({"seeds": [-1]}, "--seeds"),
        ({"schedule": "step"}, "--schedule"),
        ({"model": "resnet9000"}, "--model"),
        ({"swag_samples": 0}, "--swag_samples"),
        ({"swag_scale": float("nan")}, "--swag_scale"),
        ({"ema_sweep": []}, "--ema_sweep"),
        ({"ema_sweep": [0.0]}, "--ema_sweep"),
        ({"ema_sigma_rels": ["0.1", "x"]}, "--ema_sigma_rels"),
    ],
)
def test_bad_settings_are_rejected_with_the_flag_named(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        train_flags.validate(config(tmp_path, **overrides))


def test_sigma_rel_lists_are_parsed_as_floats(tmp_path):
    cfg = config(tmp_path, ema_sigma_rels=["0.05", "0.1"], ema_sweep=np.float32(0.07))
    train_flags.validate(cfg)
    assert cfg["ema_sigma_rels"] == [0.05, 0.1]
    assert cfg["ema_sweep"] == [pytest.approx(0.07)]


def test_swa_start_fraction_and_epoch_and_seeds():
    assert train_flags.parse_swa_start("0.75", 40) == 30
    assert train_flags.parse_swa_start("1.0", 40) == 39
    assert train_flags.parse_swa_start("12", 40) == 12
    assert train_flags.parse_seeds(["0", "1", "2"]) == [0, 1, 2]
    assert train_flags.parse_seeds(3) == [3]


# --- Schedules -----------------------------------------------------------------


def test_learning_rate_schedules_follow_the_paper(tmp_path):
    plain = recipes.paper_schedule(0.1, 100, 0.01)
    assert plain(0) == plain(50) == 0.1
    assert plain(70) == pytest.approx(0.1 * (1 - 0.99 * 0.5))
    assert plain(95) == pytest.approx(0.001)
    swa = recipes.paper_schedule(0.1, 60, 0.05 / 0.1)
    assert swa(54) == pytest.approx(0.05) and swa(80) == pytest.approx(0.05)
    cfg = config(tmp_path, schedule="paper", lr=0.1, epochs=100, swa_lr=0.05)
    plain, swa = recipes.plain_schedule(cfg), recipes.swa_schedule(cfg, swa_start=60)
    assert plain(95) == pytest.approx(0.001) and swa(54) == pytest.approx(0.05)


def test_cosine_schedules_per_epoch_by_hand(tmp_path):
    # Plain: lr * (1 + cos(pi * e / E)) / 2 with lr=0.1, E=4.
    cfg = config(tmp_path, schedule="cosine", lr=0.1, epochs=4, swa_lr=0.02)
    plain, swa = recipes.plain_schedule(cfg), recipes.swa_schedule(cfg, swa_start=2)
    half_sqrt2 = math.sqrt(2) / 2
    expected_plain = [0.1, 0.05 * (1 + half_sqrt2), 0.05, 0.05 * (1 - half_sqrt2)]
    assert [plain(e) for e in range(4)] == pytest.approx(expected_plain)
    # SWA: cosine from 0.1 to swa_lr=0.02 over the 2 epochs before
    # swa_start (0.1, 0.02 + 0.08 * (1 + cos(pi / 2)) / 2 = 0.06), then 0.02.
    assert [swa(e) for e in range(4)] == pytest.approx([0.1, 0.06, 0.02, 0.02])
    # SWA from epoch 0: the SWA rate throughout.
    swa_now = recipes.swa_schedule(cfg, swa_start=0)
    assert [swa_now(e) for e in range(4)] == pytest.approx([0.02] * 4)


# --- The report over seeds -----------------------------------------------------


def finals(rows):
    """Per-seed results from `{row: [accuracy per seed]}` (NLL = 1 - acc,
    ECE = (1 - acc) / 2)."""
    n = len(next(iter(rows.values())))
    return [
        {row: {"accuracy": acc[i], "nll": 1 - acc[i], "ece": (1 - acc[i]) / 2}
         for row, acc in rows.items()}
        for i in range(n)
    ]


def test_summary_table_is_mean_and_standard_deviation():
    summary = report.summarize(finals({"sgd": [0.90, 0.92, 0.94], "swa": [0.95, 0.95, 0.95]}))
    assert summary["sgd"]["accuracy"] == pytest.approx(0.92)
    assert summary["sgd"]["accuracy_std"] == pytest.approx(0.02)  # sample std
    assert summary["swa"]["accuracy_std"] == 0.0
    assert summary["sgd"]["nll_per_seed"] == pytest.approx([0.10, 0.08, 0.06])
    assert summary["sgd"]["ece"] == pytest.approx(0.04)
    table = report.format_table(summary)
    assert "| SGD iterate" in table and "92.00 ± 2.00%" in table and "0.0800 ± 0.0200" in table
    assert "   0.0400 ± 0.0100 |\n" in table  # ECE, the last column
    # Another order and labels (the post-hoc EMA sweep), wider labels.
    labels = {"swa": "a label longer than twenty", "sgd": "SGD"}
    lines = report.format_table(summary, labels).splitlines()
    assert lines[2].startswith("| a label longer than twenty |    95.00 ± 0.00% |")
    assert lines[3].startswith("| SGD ") and len({len(line) for line in lines}) == 1
    one = report.summarize(finals({"sgd": [0.9]}))
    assert one["sgd"]["accuracy_std"] is None
    assert "90.00%" in report.format_table(one) and "±" not in report.format_table(one)


def test_paired_differences_have_t_intervals_by_hand():
    # n = 5 seeds: t(0.975, 4) = 2.776445; differences 1, 2, 3, 4, 5 points
    # (mean 3, sample sd sqrt(2.5)): 3 +- 2.776445 * sqrt(2.5 / 5).
    base = [0.90, 0.90, 0.90, 0.90, 0.90]
    better = [0.91, 0.92, 0.93, 0.94, 0.95]
    d = stats.paired_difference(better, base, "accuracy")
    half = 2.776445 * math.sqrt(2.5 / 5) / 100
    assert d["mean"] == pytest.approx(0.03) and d["n"] == 5
    assert (d["low"], d["high"]) == pytest.approx((0.03 - half, 0.03 + half), rel=1e-5)
    assert d["verdict"] == "better"
    # Lower is better for NLL and ECE: the same differences are worse there.
    assert stats.paired_difference(better, base, "nll")["verdict"] == "worse"
    # An interval that holds 0, and ties, are no significant difference.
    mixed = stats.paired_difference([0.91, 0.89, 0.92, 0.88, 0.90], base, "ece")
    assert mixed["low"] < 0 < mixed["high"] and mixed["verdict"] == "no significant difference"
    assert stats.paired_difference(base, base, "accuracy")["verdict"] == "no significant difference"
    # A constant nonzero difference has a zero-width interval: significant.
    assert stats.paired_difference([0.91] * 5, base, "accuracy")["verdict"] == "better"
    one = stats.paired_difference([0.95], [0.9], "accuracy")
    assert one["low"] is None and one["verdict"] is None
    with pytest.raises(ValueError, match="as many seeds"):
        stats.paired_difference([0.9, 0.9], [0.9], "accuracy")


def test_report_prints_each_difference_with_its_interval_and_verdict():
    summary = report.summarize(finals({
        "sgd": [0.89, 0.90, 0.91], "swa": [0.94, 0.95, 0.97], "ema": [0.90, 0.89, 0.91],
    }))
    diffs = report.differences(summary)
    assert list(diffs) == ["swa", "ema"] and set(diffs["swa"]) == {"accuracy", "nll", "ece"}
    table = report.format_differences(summary, diffs).splitlines()
    assert table[0].startswith("Paired difference to SGD iterate (same seed")
    assert "95% t-interval over 3 seeds" in table[0]
    # SWA +5.33 points (5, 5, 6), t(0.975, 2) = 4.302653, sd 0.577: +-1.43.
    (swa_accuracy,) = [line for line in table if "SWA: average" in line and "accuracy" in line]
    assert "+5.33" in swa_accuracy and "[+3.90, +6.77]" in swa_accuracy
    assert swa_accuracy.endswith("| better |")
    (swa_nll,) = [line for line in table if "SWA: average" in line and "NLL" in line]
    assert "-0.0533" in swa_nll and swa_nll.endswith("| better |")  # NLL = 1 - accuracy
    ema = [line for line in table if "EMA: average" in line]
    assert len(ema) == 3 and all(line.endswith("| no significant difference |") for line in ema)
    assert len({len(line) for line in table[2:4]}) == 1  # the header lines align
    sentence = report.conclusion(summary)
    assert sentence.startswith("Over 3 seeds, against SGD iterate (paired, 95% t-intervals): ")
    assert "better: SWA: average accuracy (+5.33 points), SWA: average NLL (-0.0533)" in sentence
    assert sentence.endswith("no significant difference: EMA: average accuracy (+0.00 points), "
                             "EMA: average NLL (+0.0000) and EMA: average ECE (+0.0000).")
    # One seed: no interval, says so.
    one = report.conclusion(report.summarize(finals({"sgd": [0.9], "ema": [0.95]})))
    assert one.startswith("One seed") and "--seeds=0,1,2,3,4" in one and "+5.00 points" in one
    # Without plain SGD, the rows are held against the SWA run's iterate.
    swa_only = report.summarize(finals({"swa_iterate": [0.9, 0.91], "swa": [0.9, 0.91]}))
    assert report.baseline(swa_only) == "swa_iterate"
    assert "against SWA: final iterate" in report.conclusion(swa_only)
    assert report.conclusion(report.summarize(finals({"ema": [0.9]}))).startswith("One row")
    for text in (sentence, one):
        assert text.count(". ") == 0 and text.endswith(".")  # one sentence


def test_running_batch_norm_note_only_when_far_from_the_table():
    summary = report.summarize(finals({"sgd": [0.93], "swa_iterate": [0.91], "swa": [0.91]}))
    note = report.running_bn_note(
        summary, {"sgd": {"accuracy": 0.10}, "swa_iterate": {"accuracy": 0.905}}
    )
    assert "SGD iterate 10.00% (table: 93.00%)" in note and "SWA: final" not in note
    assert report.running_bn_note(summary, {"sgd": {"accuracy": 0.935}}) is None


def test_plot_legend_covers_no_curve():
    plain = {"val_accuracy": [0.5, 0.8, 0.9, 0.95]}
    history = {**plain, "val_swa_accuracy": [0.93, 0.96]}
    per_seed = {
        s: {"runs": {"sgd": {"history": plain}, "swa": {"history": history}}} for s in (0, 1)
    }
    summary = report.summarize(finals({k: [0.95, 0.96] for k in scoring.LABELS}))
    fig = plots.figure(per_seed, summary, "title")
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    # Two runs, the SWA average's curve and a marker per row.
    assert len(ax.get_legend().get_texts()) == 3 + len(scoring.LABELS)
    assert not legend.overlaps(ax.get_window_extent(renderer))


def test_model_names_of_the_flags_are_those_of_models():
    assert train_flags.MODEL_NAMES == tuple(models_lib.MODELS)


def test_max_sigma_rel_of_the_flags_is_the_library_s():
    from keras_swa import averaging

    assert train_flags.MAX_SIGMA_REL == averaging.MAX_SIGMA_REL


class ReadKeys(dict):
    """A dict that records the keys read from it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def test_mode_flags_are_exactly_those_each_mode_reads(tmp_path, monkeypatch, capsys):
    # Every mode trains (one epoch on 64 digits) from a plan whose settings
    # lack the flags `MODE_FLAGS` says the mode does not use (reading one
    # fails) and record the ones read: a flag that some modes read and
    # others do not must be in the table, with exactly the modes that read
    # it. `--swa_start` reaches the runs parsed, as `Plan.swa_start`: the
    # plan of a mode that does not use it has none.
    for flag, modes in train_flags.MODE_FLAGS.items():
        assert flag in train_flags.CONFIG_KEYS and set(modes) < set(train_flags.AVERAGING), flag
    digits = data_lib.read("digits")
    tiny = data_lib.Arrays(digits.x_train[:64], digits.y_train[:64], digits.x_test[:32],
                           digits.y_test[:32], digits.num_classes)
    monkeypatch.setattr(data_lib, "read", lambda *args: tiny)
    read = {}
    for mode in train_flags.AVERAGING:
        plan = train_lib.prepare(config(
            tmp_path, averaging=mode, epochs=1, batch_size=32, swa_start="0",
            swag_samples=1, swag_bn_batches=1, ema_sweep=[0.05], ema_snapshots=1,
            output_dir=str(tmp_path / mode),
        ))
        unused = {f for f, modes in train_flags.MODE_FLAGS.items() if mode not in modes}
        plan.config = ReadKeys({k: v for k, v in plan.config.items() if k not in unused})
        if "swa_start" in unused:
            plan.swa_start = None
        train_lib.run(plan)
        read[mode] = plan.config.read
    capsys.readouterr()
    some = set.union(*read.values()) - set.intersection(*read.values())
    assert some <= set(train_flags.MODE_FLAGS), some - set(train_flags.MODE_FLAGS)
    for flag, modes in train_flags.MODE_FLAGS.items():
        if flag != "swa_start":
            assert {m for m in read if flag in read[m]} == set(modes), flag


# --- Calibration and the post-hoc EMA pieces ---------------------------------------


def test_reliability_bins_give_the_library_s_ece():
    import keras_swa

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 10)) * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 10, size=500)
    counts, confidence, accuracy = scoring.calibration_bins(probabilities, labels)
    assert counts.sum() == 500 and (counts == 0).any()  # empty bins included
    filled = counts > 0
    assert np.isnan(accuracy[~filled]).all()
    ece = np.sum(counts[filled] / 500 * np.abs(accuracy[filled] - confidence[filled]))
    metric = keras_swa.metrics.ExpectedCalibrationError(num_bins=scoring.ECE_BINS)
    metric.update_state(labels, probabilities.astype("float32"))
    assert ece == pytest.approx(float(metric.result()), abs=1e-5)
    assert ece == pytest.approx(numpy_scores(probabilities, labels)["ece"], abs=1e-12)
    scores = scoring.scores(probabilities, labels)
    assert scores["ece"] == pytest.approx(ece, abs=1e-5)
    assert scores["nll"] == pytest.approx(numpy_scores(probabilities, labels)["nll"], rel=1e-6)


def test_snapshot_spacing_ends_at_the_last_update():
    # 1800 updates, about 20 snapshots: every 90, the last at 1800.
    assert runs.snapshot_every(1800, 20) == 90
    # 92 = 4 * 23: 23 snapshots every 4 (no divisor in [20, 22]).
    assert runs.snapshot_every(92, 20) == 4
    # A prime: no divisor up to 2 * 20; every 97 // 20 = 4 updates.
    assert runs.snapshot_every(97, 20) == 4
    # Fewer updates than snapshots wanted: every update.
    assert runs.snapshot_every(7, 20) == 1


def test_stale_snapshots_are_cleared_and_nothing_else(tmp_path):
    for name in ("ema-0000000004.npz", "ema-0000000008.npz", "notes.txt", "ema-last.npz"):
        (tmp_path / name).write_text("")
    assert runs.clear_snapshots(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == ["ema-last.npz", "notes.txt"]
    assert runs.clear_snapshots(str(tmp_path / "missing")) == 0


def test_examples_keep_functions_and_classes_short():
    # One job per function and class (issue 22): no function over 100
    # lines, no class over 250, docstrings included; the benchmark's main
    # under 60.
    import ast

    folder = os.path.join(ROOT, "examples")
    long = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(folder, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = node.end_lineno - node.lineno + 1 + len(node.decorator_list)
                limit = 250 if isinstance(node, ast.ClassDef) else 100
                if name == "benchmark.py" and node.name == "main":
                    limit = 59
                if lines > limit:
                    long.append(f"{name}:{node.name} ({lines} lines > {limit})")
    assert not long, long


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
