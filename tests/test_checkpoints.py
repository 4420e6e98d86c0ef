"""Tests of `keras_swa.average_checkpoints` and `keras_swa.greedy_soup`."""

import os
import warnings
import zipfile

import keras
import numpy as np
import pytest

import keras_swa

FLOATS = ("float16", "bfloat16", "float32", "float64")


@keras.saving.register_keras_serializable(package="test_checkpoints")
class Counter(keras.layers.Layer):
    """Passes its input through; holds an integer variable, as a counter."""

    def build(self, input_shape):
        self.count = self.add_weight(
            shape=(), dtype="int32", initializer="zeros", trainable=False
        )

    def call(self, x):
        return x


def _model(hidden=8, float16_layer=False):
    inputs = keras.Input((4,))
    h = keras.layers.Dense(hidden, name="hidden")(inputs)
    h = keras.layers.BatchNormalization(name="norm")(h)
    h = Counter(name="counter")(h)
    if float16_layer:
        h = keras.layers.Dense(5, dtype="float16", name="half")(h)
    outputs = keras.layers.Dense(3, dtype="float32", name="head")(h)
    return keras.Model(inputs, outputs)


def _values(model):
    return [np.array(v.numpy()) for v in model.weights]


def _assert_unchanged(model, before):
    for variable, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(np.array(variable.numpy()), value)


def _randomize(model, rng, count, scale=1.0):
    """Gives every variable new random values (variances stay positive)."""
    for variable in model.weights:
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if dtype in FLOATS:
            value = rng.normal(0.0, scale, variable.shape)
            if "variance" in variable.path:
                value = np.abs(value) + 0.5
            variable.assign(value.astype(dtype))
        else:
            variable.assign(np.full(variable.shape, count, dtype))


def _save(model, path):
    if path.endswith(".keras"):
        model.save(path)
    else:
        model.save_weights(path)


def _checkpoints(tmp_path, model, suffixes, seed=0, scale=1.0):
    """Saves one checkpoint per suffix with random values; returns the paths
    and the stored values (float64 for float variables)."""
    rng = np.random.default_rng(seed)
    paths, stored = [], []
    for i, suffix in enumerate(suffixes):
        _randomize(model, rng, count=i + 1, scale=scale)
        path = str(tmp_path / f"{i:03d}{suffix}")
        _save(model, path)
        paths.append(path)
        stored.append(_values(model))
    return paths, stored


def _reference_mean(stored, weights):
    weights = np.asarray(weights, dtype="float64")
    weights = weights / weights.sum()
    return [
        sum(w * s[i].astype("float64") for w, s in zip(weights, stored))
        for i in range(len(stored[0]))
    ]


def _assert_mean(model, stored, weights, rtol=1e-6):
    reference = _reference_mean(stored, weights)
    for variable, expected, last in zip(
        model.weights, reference, stored[-1], strict=True
    ):
        actual = np.array(variable.numpy())
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if dtype in FLOATS:
            # The mean in float64, rounded once to the variable's dtype.
            np.testing.assert_allclose(
                actual.astype("float64"),
                expected.astype(dtype).astype("float64"),
                rtol=rtol,
                atol=1e-7,
                err_msg=variable.path,
            )
        else:
            np.testing.assert_array_equal(actual, last, err_msg=variable.path)


FORMATS = {
    "weights_h5": [".weights.h5"] * 3,
    "keras": [".keras"] * 3,
    "mixed": [".weights.h5", ".keras", ".weights.h5"],
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_uniform_mean_matches_numpy(tmp_path, fmt):
    keras.utils.set_random_seed(0)
    paths, stored = _checkpoints(tmp_path, _model(), FORMATS[fmt])
    model = _model()
    with pytest.warns(UserWarning, match="averaged the BatchNormalization"):
        keras_swa.average_checkpoints(model, paths)
    _assert_mean(model, stored, [1, 1, 1])
    # The integer counter comes from the last file.
    assert int(model.get_layer("counter").count.numpy()) == 3


@pytest.mark.parametrize("fmt", ["weights_h5", "keras"])
def test_weighted_mean_matches_numpy(tmp_path, fmt):
    keras.utils.set_random_seed(0)
    paths, stored = _checkpoints(tmp_path, _model(), FORMATS[fmt])
    model = _model()
    weights = [np.float32(0.5), 0, 2]  # NumPy scalars and ints alike.
    with pytest.warns(UserWarning):
        keras_swa.average_checkpoints(model, paths, weights=weights)
    _assert_mean(model, stored, [0.5, 0.0, 2.0])


def test_mixed_precision_model_averages_in_float32(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    source = _model(float16_layer=True)
    paths, stored = _checkpoints(
        tmp_path, source, [".weights.h5", ".keras", ".weights.h5"]
    )
    model = _model(float16_layer=True)
    half = model.get_layer("half").kernel
    assert keras.backend.standardize_dtype(half.dtype) == "float16"
    with pytest.warns(UserWarning):
        keras_swa.average_checkpoints(model, paths)
    _assert_mean(model, stored, [1, 1, 1], rtol=1e-3)

    # Three float16 values near the top of its range: their sum overflows
    # float16, not the float32 accumulator.
    big = np.full(source.get_layer("half").kernel.shape, 60000.0, "float16")
    for i, path in enumerate(paths):
        source.get_layer("half").kernel.assign(big - i)
        _save(source, path)
    with pytest.warns(UserWarning):
        keras_swa.average_checkpoints(model, paths)
    np.testing.assert_array_equal(
        np.array(half.numpy()), np.full(big.shape, 59999.0, "float16")
    )


def _data(size=32):
    rng = np.random.default_rng(1)
    return rng.normal(1.0, 2.0, (size, 4)).astype("float32")


def test_batch_norm_recomputed_with_bn_data_and_averaged_without(tmp_path):
    keras.utils.set_random_seed(0)
    paths, stored = _checkpoints(tmp_path, _model(), [".weights.h5"] * 3)
    x = _data()
    names = [v.path for v in _model().weights]
    mean = dict(zip(names, _reference_mean(stored, [1, 1, 1])))

    averaged = _model()
    with pytest.warns(UserWarning, match="Pass `bn_data`"):
        keras_swa.average_checkpoints(averaged, paths)
    recomputed = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keras_swa.average_checkpoints(recomputed, paths, bn_data=x, verbose=0)
    assert not [w for w in caught if "BatchNormalization" in str(w.message)]

    # Without data: the mean of the stored statistics.
    for variable in averaged.get_layer("norm").non_trainable_weights:
        np.testing.assert_allclose(
            variable.numpy(), mean[variable.path], rtol=1e-6
        )
    # With data (one batch of 32): the statistics of the averaged hidden
    # layer's output, in NumPy.
    kernel = mean[recomputed.get_layer("hidden").kernel.path]
    bias = mean[recomputed.get_layer("hidden").bias.path]
    hidden = x.astype("float64") @ kernel + bias
    norm = recomputed.get_layer("norm")
    np.testing.assert_allclose(
        norm.moving_mean.numpy(), hidden.mean(0), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        norm.moving_variance.numpy(), hidden.var(0), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(
        norm.moving_mean.numpy(),
        averaged.get_layer("norm").moving_mean.numpy(),
        atol=1e-3,
    )
    # The other weights are the plain mean in both.
    for a, r in zip(averaged.trainable_weights, recomputed.trainable_weights):
        np.testing.assert_array_equal(a.numpy(), r.numpy())


def test_failing_batch_norm_pass_leaves_the_model_unchanged(tmp_path):
    keras.utils.set_random_seed(0)
    paths, _ = _checkpoints(tmp_path, _model(), [".weights.h5"] * 2)
    model = _model()
    before = _values(model)
    with pytest.raises(ValueError, match="no batch"):
        keras_swa.average_checkpoints(
            model, paths, bn_data=np.zeros((0, 4), "float32"), verbose=0
        )
    _assert_unchanged(model, before)


def test_optimizer_state_is_kept(tmp_path):
    keras.utils.set_random_seed(0)
    x = _data()
    y = np.random.default_rng(2).integers(0, 3, len(x))
    model = _model()
    model.compile(
        keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy"
    )
    model.fit(x, y, epochs=2, verbose=0)
    paths, stored = _checkpoints(tmp_path, _model(), [".keras"] * 2)
    optimizer_before = [np.array(v.numpy()) for v in model.optimizer.variables]
    with pytest.warns(UserWarning):
        keras_swa.average_checkpoints(model, paths)
    _assert_mean(model, stored, [1, 1])
    for variable, value in zip(
        model.optimizer.variables, optimizer_before, strict=True
    ):
        np.testing.assert_array_equal(np.array(variable.numpy()), value)


def _bad_inputs(tmp_path):
    """(paths, weights, exception, message) of every rejected input."""
    keras.utils.set_random_seed(0)
    good, _ = _checkpoints(tmp_path, _model(), [".weights.h5", ".keras"])
    other = str(tmp_path / "other.weights.h5")
    _model(hidden=9).save_weights(other)
    extra = str(tmp_path / "extra.keras")
    _model(float16_layer=True).save(extra)
    nan = str(tmp_path / "nan.weights.h5")
    broken = _model()
    broken.get_layer("head").kernel.assign(
        np.full(broken.get_layer("head").kernel.shape, np.nan, "float32")
    )
    broken.save_weights(nan)
    missing = str(tmp_path / "missing.weights.h5")
    return [
        (good + [other], None, ValueError, "other.weights.h5"),
        (good + [extra], None, ValueError, "extra.keras"),
        (good + [nan], None, ValueError, "nan.weights.h5.*non-finite"),
        (good + [missing], None, ValueError, "missing.weights.h5"),
        ([], None, ValueError, "`paths` is empty"),
        (good[0], None, TypeError, "`paths`"),
        (good + [str(tmp_path / "x.h5")], None, ValueError, "x.h5"),
        (good, [1.0], ValueError, "`weights`.*2 paths, 1 weights"),
        (good, [1.0, -1.0], ValueError, "`weights`"),
        (good, [0, 0.0], ValueError, "`weights` must not all be zero"),
        (good, [1.0, np.nan], ValueError, "`weights`"),
        (good, [True, 1.0], TypeError, "`weights`"),
    ]


def test_bad_input_is_rejected_and_the_model_unchanged(tmp_path):
    model = _model()
    before = _values(model)
    for paths, weights, error, message in _bad_inputs(tmp_path):
        with pytest.raises(error, match=message):
            keras_swa.average_checkpoints(model, paths, weights=weights)
        _assert_unchanged(model, before)
    good = _bad_inputs(tmp_path)[0][0][:2]
    with pytest.raises(TypeError, match="`bn_steps`"):
        keras_swa.average_checkpoints(
            model, good, bn_data=_data(), bn_steps=1.5
        )
    _assert_unchanged(model, before)


def _linear_model():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    return model


def _soup_case(tmp_path):
    """Good ingredients: the true weights plus independent noise, so their
    mean is closer to the truth; one bad ingredient far from it."""
    rng = np.random.default_rng(0)
    true_kernel = rng.normal(size=(5, 1))
    x = rng.normal(size=(200, 5)).astype("float32")
    y = (x @ true_kernel + 0.3).astype("float32")
    model = _linear_model()
    paths, kernels = [], []
    for i, scale in enumerate([0.3, 0.3, 0.3, 0.3, 3.0]):
        kernel = true_kernel + rng.normal(0.0, scale, (5, 1))
        if scale > 1:
            kernel = kernel + 2.0
        model.set_weights([kernel.astype("float32"), np.array([0.3], "f4")])
        paths.append(str(tmp_path / f"ingredient_{i}.weights.h5"))
        model.save_weights(paths[-1])
        kernels.append(kernel.astype("float32").astype("float64"))
    return paths, kernels, x, y


def _mse(kernel, x, y):
    return float(np.mean((x.astype("float64") @ kernel + 0.3 - y) ** 2))


def test_greedy_soup_leaves_out_the_bad_ingredient(tmp_path):
    keras.utils.set_random_seed(0)
    paths, kernels, x, y = _soup_case(tmp_path)
    model = _linear_model()
    chosen = keras_swa.greedy_soup(model, paths, (x, y), metric="loss")

    singles = [_mse(k, x, y) for k in kernels]
    assert isinstance(chosen, list) and chosen.metric == "loss"
    assert paths[-1] not in chosen  # The bad one.
    assert chosen[0] == paths[int(np.argmin(singles))]
    # The model holds the mean of the chosen files.
    soup_kernel = np.mean([kernels[paths.index(p)] for p in chosen], axis=0)
    np.testing.assert_allclose(
        model.layers[0].kernel.numpy(), soup_kernel, rtol=1e-6
    )
    soup_loss = _mse(soup_kernel, x, y)
    assert soup_loss <= min(singles)
    assert chosen.soup_metric == pytest.approx(soup_loss, rel=1e-4)
    # One step per file, best single file first, each with its own loss.
    assert [s.path for s in chosen.steps] == [
        paths[i] for i in np.argsort(singles, kind="stable")
    ]
    for step in chosen.steps:
        assert step.metric == pytest.approx(
            singles[paths.index(step.path)], rel=1e-4
        )
    assert [s.path for s in chosen.steps if s.added] == list(chosen)
    assert len(chosen) >= 2


def test_greedy_soup_maximizes_accuracy(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4)).astype("float32")
    true_kernel = rng.normal(size=(4, 3))
    y = np.argmax(x @ true_kernel, axis=1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(
        "sgd",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    paths, kernels = [], []
    # The last ingredient predicts the opposite class order.
    ingredients = [(0.5, 1), (0.5, 1), (0.5, 1), (0.2, -1)]
    for i, (scale, flip) in enumerate(ingredients):
        kernel = flip * true_kernel + rng.normal(0.0, scale, (4, 3))
        model.set_weights([kernel.astype("float32"), np.zeros(3, "float32")])
        paths.append(str(tmp_path / f"{i}.keras"))
        model.save(paths[-1])
        kernels.append(kernel.astype("float32").astype("float64"))
    accuracy = [float(np.mean(np.argmax(x @ k, 1) == y)) for k in kernels]
    chosen = keras_swa.greedy_soup(model, paths, (x, y))
    assert paths[3] not in chosen
    assert chosen[0] == paths[int(np.argmax(accuracy))]
    assert chosen.soup_metric >= max(accuracy)
    soup_kernel = np.mean([kernels[paths.index(p)] for p in chosen], axis=0)
    soup_accuracy = float(np.mean(np.argmax(x @ soup_kernel, 1) == y))
    assert chosen.soup_metric == pytest.approx(soup_accuracy)


def test_greedy_soup_bad_input_leaves_the_model_unchanged(tmp_path):
    keras.utils.set_random_seed(0)
    paths, _, x, y = _soup_case(tmp_path)
    model = _linear_model()
    before = _values(model)
    other = str(tmp_path / "other.weights.h5")
    keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)]).save_weights(
        other
    )
    cases = [
        (dict(paths=paths + [other]), ValueError, "other.weights.h5"),
        (dict(metric="accuracy"), ValueError, "reports no metric 'accuracy'"),
        (dict(mode="up"), ValueError, "`mode`"),
        (dict(metric=3), TypeError, "`metric`"),
        (dict(validation_data=None), ValueError, "`validation_data`"),
        (dict(paths=[]), ValueError, "`paths` is empty"),
    ]
    for overrides, error, message in cases:
        arguments = dict(paths=paths, validation_data=(x, y), metric="loss")
        arguments.update(overrides)
        with pytest.raises(error, match=message):
            keras_swa.greedy_soup(model, **arguments)
        _assert_unchanged(model, before)

    uncompiled = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="compiled"):
        keras_swa.greedy_soup(uncompiled, paths, (x, y), metric="loss")


def test_keras_file_without_weights_member_is_rejected(tmp_path):
    path = str(tmp_path / "empty.keras")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{}")
    model = _model()
    before = _values(model)
    with pytest.raises(ValueError, match="empty.keras"):
        keras_swa.average_checkpoints(model, [path])
    _assert_unchanged(model, before)
    assert os.path.exists(path)


def test_greedy_soup_adds_an_ingredient_that_ties(tmp_path):
    # A copy of the best file leaves the soup's metric equal: `>=` adds it.
    keras.utils.set_random_seed(0)
    paths, kernels, x, y = _soup_case(tmp_path)
    best = paths[int(np.argmin([_mse(k, x, y) for k in kernels]))]
    copy = str(tmp_path / "copy.weights.h5")
    with open(best, "rb") as source, open(copy, "wb") as target:
        target.write(source.read())
    chosen = keras_swa.greedy_soup(
        _linear_model(), [best, paths[-1], copy], (x, y), metric="loss"
    )
    assert list(chosen) == [best, copy]
    assert [step.added for step in chosen.steps] == [True, True, False]
    assert chosen.steps[1].soup_metric == chosen.steps[0].metric


def test_greedy_soup_skips_non_finite_ingredients_with_a_warning(tmp_path):
    # Issue 21.9: an ingredient whose metric is NaN could be chosen (NaN
    # sorts anywhere), and the soup end NaN. Its weights are finite (files
    # with NaN are refused when read), but so large that the loss overflows.
    keras.utils.set_random_seed(0)
    paths, kernels, x, y = _soup_case(tmp_path)
    model = _linear_model()
    nan_path = str(tmp_path / "diverged.weights.h5")
    model.set_weights([np.full((5, 1), 3e38, "f4"), np.array([0.3], "f4")])
    model.save_weights(nan_path)
    good = paths[:-1]
    for order in ([nan_path] + good, good + [nan_path]):
        with pytest.warns(UserWarning, match="diverged.weights.h5"):
            chosen = keras_swa.greedy_soup(model, order, (x, y),
                                           metric="loss")
        assert nan_path not in chosen
        assert np.isfinite(chosen.soup_metric)
        assert np.all(np.isfinite(model.layers[0].kernel.numpy()))
        soup_kernel = np.mean([kernels[paths.index(p)] for p in chosen], 0)
        np.testing.assert_allclose(model.layers[0].kernel.numpy(),
                                   soup_kernel, rtol=1e-6)
        skipped = [s for s in chosen.steps if s.path == nan_path]
        assert len(skipped) == 1 and not skipped[0].added
    before = _values(model)
    with pytest.raises(ValueError, match="non-finite"):
        keras_swa.greedy_soup(model, [nan_path], (x, y), metric="loss")
    _assert_unchanged(model, before)


def test_greedy_soup_refuses_single_use_validation_data(tmp_path):
    # Issue 21.12: a generator was used up by the first evaluation.
    paths, _, x, y = _soup_case(tmp_path)
    model = _linear_model()
    before = _values(model)
    batches = ((x[i:i + 50], y[i:i + 50]) for i in range(0, 200, 50))
    with pytest.raises(ValueError, match="validation_data"):
        keras_swa.greedy_soup(model, paths, batches, metric="loss")
    _assert_unchanged(model, before)


def test_soups_print_nothing_under_verbose_0(tmp_path, capfd):
    # Issue 24.7: no progress bar under verbose=0.
    model = _model()
    paths, _ = _checkpoints(tmp_path, model, [".weights.h5"] * 2)
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = np.zeros((64,), "int32")
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    capfd.readouterr()
    keras_swa.average_checkpoints(model, paths, bn_data=x, verbose=0)
    keras_swa.greedy_soup(model, paths, (x, y), bn_data=x, verbose=0)
    out, err = capfd.readouterr()
    assert "step" not in out and "━" not in out, out
