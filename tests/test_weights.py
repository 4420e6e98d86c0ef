"""Tests of `keras_swa.assign_average` and `keras_swa.averaged_weights`."""

import keras
import numpy as np
import pytest

import keras_swa

EPSILON = 1e-3  # BatchNormalization's default.
START, PERIOD = 2, 3  # Snapshots after updates 2, 5, 8, 11.
EPOCHS, BATCH = 3, 16  # 64 samples: 4 updates an epoch, 12 in all.


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (64, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1)) + 0.5).astype("float32")
    return x, y


def _model():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, name="hidden_dense")(inputs)
    hidden = keras.layers.BatchNormalization(name="norm")(hidden)
    hidden = keras.layers.ReLU()(hidden)
    return keras.Model(inputs, keras.layers.Dense(1)(hidden))


class _Snapshots(keras.callbacks.Callback):
    """Records the weights after each update on which SWA takes a snapshot."""

    def __init__(self):
        super().__init__()
        self.update = 0
        self.snapshots = []

    def on_train_batch_end(self, batch, logs=None):
        if self.update >= START and (self.update - START) % PERIOD == 0:
            self.snapshots.append(
                [v.numpy().copy() for v in self.model.trainable_variables]
            )
        self.update += 1


def _trained(start_averaging=START):
    keras.utils.set_random_seed(0)
    x, y = _data()
    model = _model()
    optimizer = keras_swa.SWA(
        keras.optimizers.SGD(0.05, momentum=0.9),
        start_averaging=start_averaging,
        average_period=PERIOD,
    )
    model.compile(optimizer=optimizer, loss="mse")
    snapshots = _Snapshots()
    model.fit(
        x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0, callbacks=[snapshots]
    )
    return model, optimizer, snapshots.snapshots


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


def _assert_same(before, after):
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def _reference_statistics(model, x, sizes=(32, 32)):
    """The BN statistics of `model` over `x` in batches of 32, in NumPy."""
    kernel, bias = (
        w.astype("float64")
        for w in model.get_layer("hidden_dense").get_weights()
    )
    a = x.astype("float64") @ kernel + bias
    parts = np.split(a, np.cumsum(sizes)[:-1])
    weights = np.asarray(sizes, dtype="float64") / sum(sizes)
    mean = sum(w * p.mean(0) for w, p in zip(weights, parts))
    variance = sum(w * p.var(0) for w, p in zip(weights, parts))
    return mean, variance


def test_assign_average_after_fit_matches_numpy_running_mean():
    model, optimizer, snapshots = _trained()
    assert len(snapshots) == 4
    assert int(optimizer.n_averaged.numpy()) == 4
    norm = model.get_layer("norm")
    statistics = _values([norm.moving_mean, norm.moving_variance])

    assert keras_swa.assign_average(model) is None

    _assert_same(
        _values(optimizer.average_variables), _values(model.trainable_variables)
    )
    expected = [np.mean(s, axis=0) for s in zip(*snapshots)]
    for got, want in zip(
        _values(model.trainable_variables), expected, strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Without `bn_data` the statistics stay those of training.
    _assert_same(statistics, _values([norm.moving_mean, norm.moving_variance]))


def test_assign_average_recomputes_batch_norm():
    model, optimizer, _ = _trained()
    x, _ = _data()

    keras_swa.assign_average(model, optimizer, bn_data=x, bn_steps=2)

    _assert_same(
        _values(optimizer.average_variables), _values(model.trainable_variables)
    )
    mean, variance = _reference_statistics(model, x)
    norm = model.get_layer("norm")
    np.testing.assert_allclose(
        norm.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        norm.moving_variance.numpy(), variance, rtol=1e-5
    )
    assert norm.momentum == 0.99


def test_assign_average_unwraps_loss_scale_optimizer():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model, optimizer, _ = _trained()
    finally:
        keras.config.set_dtype_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.optimizer.inner_optimizer is optimizer
    x, _ = _data()

    keras_swa.assign_average(model, bn_data=x)

    _assert_same(
        _values(optimizer.average_variables), _values(model.trainable_variables)
    )
    assert model.get_layer("norm").moving_mean.dtype == "float32"


def test_nothing_averaged_raises_and_leaves_model():
    model, optimizer, _ = _trained(start_averaging=1000)
    before = _values(model.weights)
    with pytest.raises(ValueError, match="n_averaged=0"):
        keras_swa.assign_average(model)
    with pytest.raises(ValueError, match="n_averaged=0"):
        with keras_swa.averaged_weights(model):
            pytest.fail("The block must not run.")
    _assert_same(before, _values(model.weights))


@pytest.mark.parametrize(
    "source",
    [keras.optimizers.SGD(0.1), "swa", object()],
    ids=["plain optimizer", "str", "object"],
)
def test_bad_source_raises_type_error(source):
    model = _model()
    with pytest.raises(TypeError, match="`source`"):
        keras_swa.assign_average(model, source)


def test_uncompiled_model_without_source_raises_type_error():
    with pytest.raises(TypeError, match="`source`.*model.optimizer"):
        keras_swa.assign_average(_model())


class _Constant:
    """A minimal source, as `StochasticWeightAveraging` will be one."""

    def __init__(self, value):
        self.value = value
        self.n_averaged = keras.Variable(1, dtype="int32", trainable=False)

    def assign_average_vars(self, var_list):
        for variable in var_list:
            variable.assign(np.full(variable.shape, self.value, variable.dtype))


def test_any_object_with_the_protocol_is_a_source():
    keras.utils.set_random_seed(1)
    model = _model()
    keras_swa.assign_average(model, _Constant(0.25))
    for value in _values(model.trainable_variables):
        np.testing.assert_array_equal(value, 0.25)


def test_assign_average_restores_model_when_update_bn_fails():
    model, _, _ = _trained()
    before = _values(model.weights)
    with pytest.raises(ValueError, match="no batch"):
        keras_swa.assign_average(model, bn_data=np.zeros((0, 4), "float32"))
    _assert_same(before, _values(model.weights))


def test_averaged_weights_swaps_and_restores_bitwise():
    model, optimizer, _ = _trained()
    x, y = _data()
    norm = model.get_layer("norm")
    before = _values(model.weights)

    with keras_swa.averaged_weights(model, bn_data=x) as value:
        assert value is None
        _assert_same(
            _values(optimizer.average_variables),
            _values(model.trainable_variables),
        )
        mean, variance = _reference_statistics(model, x, sizes=(32, 32))
        np.testing.assert_allclose(
            norm.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            norm.moving_variance.numpy(), variance, rtol=1e-5
        )
        averaged_loss = model.evaluate(x, y, verbose=0)

    _assert_same(before, _values(model.weights))
    assert averaged_loss != model.evaluate(x, y, verbose=0)


def test_averaged_weights_restores_when_block_raises():
    model, optimizer, _ = _trained()
    before = _values(model.weights)
    with pytest.raises(RuntimeError, match="inside"):
        with keras_swa.averaged_weights(model, optimizer):
            _assert_same(
                _values(optimizer.average_variables),
                _values(model.trainable_variables),
            )
            raise RuntimeError("inside")
    _assert_same(before, _values(model.weights))


def test_averaged_weights_restores_when_update_bn_fails_on_entry():
    model, _, _ = _trained()
    before = _values(model.weights)
    with pytest.raises(ValueError, match="no batch"):
        with keras_swa.averaged_weights(
            model, bn_data=np.zeros((0, 4), "float32")
        ):
            pytest.fail("The block must not run.")
    _assert_same(before, _values(model.weights))


def test_training_goes_on_from_raw_weights():
    # A fit after the block continues from the raw weights, as if there had
    # been no block.
    model, _, _ = _trained()
    twin, _, _ = _trained()
    x, y = _data()
    with keras_swa.averaged_weights(model, bn_data=x):
        pass
    for m in (model, twin):
        m.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    _assert_same(_values(twin.weights), _values(model.weights))


@pytest.mark.parametrize("verbose,shows_bar", [(0, False), (1, True)])
def test_verbose_controls_the_batch_norm_progress_bar(capsys, verbose, shows_bar):
    model, _, _ = _trained()
    x, _ = _data()
    capsys.readouterr()
    keras_swa.assign_average(model, bn_data=x, verbose=verbose)
    with keras_swa.averaged_weights(model, bn_data=x, verbose=verbose):
        pass
    out = capsys.readouterr().out
    assert ("2/2" in out) is shows_bar
