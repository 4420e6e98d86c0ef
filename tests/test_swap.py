"""Tests of the one swap, `keras_swa.swap.Swap`, and of the functions that
swap weights into a model through it (`averaged_weights`, `assign_average`,
`sampled_weights`, `predict_bma`, `update_bn`).

The models are frozen after training (`layer.trainable = False` or
`model.trainable = False` set after `fit`): every variable a function wrote
must come back bit for bit, and the averages must go into the variables they
were taken from, wherever `trainable` now stands. Everything runs on every
backend.
"""

import keras
import numpy as np
import pytest

import keras_swa
from keras_swa import batch_norm
from keras_swa import swap
from keras_swa import weights

try:
    import tensorflow as tf
except ImportError:
    tf = None

FREEZES = ("layer", "model")
SAMPLE = {"scale": 0.5, "seed": 3}


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (32, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1)) + 0.5).astype("float32")
    return x, y


def _model():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, name="hidden_dense")(inputs)
    hidden = keras.layers.BatchNormalization(name="norm")(hidden)
    hidden = keras.layers.ReLU()(hidden)
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(hidden))


def _trained(kind):
    """A model trained for 2 epochs of 4 updates, with the SWA wrapper
    (4 snapshots; the model holds the raw weights) or the SWAG callback (2
    snapshots, rank 2; the model holds their mean, BN recomputed); and the
    variables averaged."""
    keras.utils.set_random_seed(0)
    x, y = _data()
    model = _model()
    if kind == "wrapper":
        source = keras_swa.SWA(
            keras.optimizers.SGD(0.05, momentum=0.9),
            start_averaging=1,
            average_period=2,
        )
        model.compile(optimizer=source, loss="mse")
        callbacks = []
    else:
        source = keras_swa.SWAG(
            start_epoch=0, max_rank=2, bn_data=x, verbose=0
        )
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        callbacks = [source]
    averaged = list(model.trainable_variables)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=callbacks)
    return model, source, averaged, x


def _freeze(model, how):
    if how == "layer":
        # Its kernel and bias become non-trainable; BN stays trainable (its
        # statistics are recomputed with `bn_data`).
        model.get_layer("hidden_dense").trainable = False
    else:
        model.trainable = False


def _state(model):
    return [np.array(variable.numpy()) for variable in model.variables]


def _assert_state(model, before):
    for variable, value in zip(model.variables, before, strict=True):
        np.testing.assert_array_equal(
            variable.numpy(), value, err_msg=variable.path
        )


def _assert_values(variables, values):
    for variable, value in zip(variables, values, strict=True):
        np.testing.assert_array_equal(
            variable.numpy(), np.asarray(value), err_msg=variable.path
        )


# The swap itself.


def _variables():
    """Variables of every kind a swap records: float32, float64 (but on JAX,
    which has it only with `jax_enable_x64`), bfloat16, int32; trainable or
    not."""
    variables = [
        keras.Variable(np.arange(6.0).reshape(2, 3), dtype="float32"),
        keras.Variable([1.5, -3.0], dtype="bfloat16"),
        keras.Variable([7, -1], dtype="int32", trainable=False),
    ]
    if keras.backend.backend() != "jax":
        variables.append(
            keras.Variable([0.1, 1e-300, -2.5], dtype="float64",
                           trainable=False)
        )
    return variables


def _scribble(variables):
    for variable in variables:
        variable.assign(np.full(variable.shape, 9, variable.dtype))


def test_swap_restores_every_variable_on_exit_and_on_error():
    variables = _variables()
    before = [np.array(variable.numpy()) for variable in variables]
    with swap.Swap(variables) as swapped:
        assert swapped.variables == variables
        _scribble(variables)
    _assert_values(variables, before)
    with pytest.raises(RuntimeError, match="inside"):
        with swap.Swap(variables):
            _scribble(variables)
            raise RuntimeError("inside")
    _assert_values(variables, before)


def test_keep_leaves_the_writes_and_restore_runs_once():
    variables = _variables()
    before = [np.array(variable.numpy()) for variable in variables]
    with swap.Swap(variables) as swapped:
        _scribble(variables)
        swapped.keep()
    for variable in variables:
        np.testing.assert_array_equal(variable.numpy(), 9)
    # Explicit restore, without `with`; then exit and a second restore do
    # nothing more (the writes after the restore stay).
    swapped = swap.Swap(variables)
    for variable, value in zip(variables, before):
        variable.assign(value)
    swapped.restore()
    _assert_values(variables, [np.full(v.shape, 9, v.dtype) for v in variables])
    _scribble(variables[:1])
    swapped.restore()
    with swapped:
        pass
    np.testing.assert_array_equal(variables[0].numpy(), 9)


def test_a_variable_listed_twice_is_recorded_once():
    variables = _variables()
    swapped = swap.Swap(variables + variables[::-1])
    assert swapped.variables == variables


class _Unwritable:
    """A variable whose writes fail."""

    def __init__(self):
        self.value = keras.ops.zeros((2,))

    def assign(self, value):
        raise OSError("cannot write")


def test_restore_goes_on_past_a_failing_variable():
    variables = _variables()
    before = [np.array(variable.numpy()) for variable in variables]
    swapped = swap.Swap([variables[0], _Unwritable(), *variables[1:]])
    _scribble(variables)
    with pytest.raises(OSError, match="cannot write"):
        swapped.restore()
    _assert_values(variables, before)


@pytest.mark.tensorflow_only
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute"
)
def test_swap_restores_each_replica_under_tf_distribute():
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs the two logical CPU devices of conftest.py")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        variable = keras.Variable(np.zeros(3), dtype="float32")
    # Replicas that differ, as an unsynchronized BatchNormalization's do.
    for index, component in enumerate(variable.value.values):
        component.assign(np.full(3, index + 1.0, "float32"))
    with swap.Swap([variable]):
        variable.assign(np.full(3, 5.0, "float32"))
    replicas = [component.numpy() for component in variable.value.values]
    np.testing.assert_array_equal(replicas, [[1.0] * 3, [2.0] * 3])


# Models frozen after training (issue 21, points 1 and 2).


@pytest.mark.parametrize("how", FREEZES)
def test_averages_on_a_model_frozen_after_training(how):
    model, source, averaged, x = _trained("wrapper")
    averages = [np.array(a.numpy()) for a in source.average_variables]
    _freeze(model, how)
    before = _state(model)

    with keras_swa.averaged_weights(model, bn_data=x, verbose=0):
        # The averages are in, frozen variables included.
        _assert_values(averaged, averages)
    _assert_state(model, before)
    with pytest.raises(RuntimeError, match="inside"):
        with keras_swa.averaged_weights(model, bn_data=x, verbose=0):
            raise RuntimeError("inside")
    _assert_state(model, before)

    # In at one point, out at another; the swap holds exactly what was
    # written: the averaged variables and the statistics update_bn wrote.
    swapped = weights.swap_in(
        model, None, batch_norm.BNRecompute.checked(x, None, None, verbose=0)
    )
    _assert_values(averaged, averages)
    assert {id(v) for v in swapped.variables} == {
        id(v) for v in averaged + batch_norm.statistics_variables(model)
    }
    swapped.restore()
    _assert_state(model, before)

    # An error (no batch in `bn_data`) leaves everything as it was.
    with pytest.raises(ValueError, match="no batch"):
        keras_swa.assign_average(
            model, bn_data=np.zeros((0, 4), "float32"), verbose=0
        )
    _assert_state(model, before)
    # For good: exactly the averages, into the variables they were taken
    # from; nothing else is written (the BN statistics are not averaged).
    keras_swa.assign_average(model, verbose=0)
    _assert_values(averaged, averages)
    held = {id(variable) for variable in averaged}
    for variable, value in zip(model.variables, before):
        if id(variable) not in held:
            np.testing.assert_array_equal(variable.numpy(), value)


@pytest.mark.parametrize("how", FREEZES)
def test_swag_samples_on_a_model_frozen_after_training(how):
    model, swag, averaged, x = _trained("swag")
    _freeze(model, how)
    before = _state(model)

    with keras_swa.sampled_weights(model, swag, bn_data=x, **SAMPLE):
        # The sample is in, frozen variables included.
        _assert_values(averaged, swag.sample(**SAMPLE))
    _assert_state(model, before)
    with pytest.raises(RuntimeError, match="inside"):
        with keras_swa.sampled_weights(model, swag, bn_data=x, **SAMPLE):
            raise RuntimeError("inside")
    _assert_state(model, before)

    keras_swa.predict_bma(model, x, swag, num_samples=2, bn_data=x)
    _assert_state(model, before)
    # Inputs of the wrong shape fail in `predict`, after a sample was in.
    with pytest.raises(Exception):
        keras_swa.predict_bma(
            model, np.zeros((4, 7), "float32"), swag, num_samples=2,
            bn_data=x,
        )
    _assert_state(model, before)


def test_update_bn_restores_every_statistic_when_a_write_fails(monkeypatch):
    keras.utils.set_random_seed(0)
    model = _model()
    x, _ = _data()
    before = _state(model)
    statistics = batch_norm._statistics

    def broken_statistics(*args):
        # The second value cannot be written (wrong shape), after the
        # first was.
        pairs = statistics(*args)
        pairs[1] = (pairs[1][0], np.zeros((99,), "float32"))
        return pairs

    monkeypatch.setattr(batch_norm, "_statistics", broken_statistics)
    with pytest.raises(Exception):
        keras_swa.update_bn(model, x, verbose=0)
    _assert_state(model, before)


# No output under verbose=0 (issue 24, point 7).


def _bn_data(form, x):
    if form == "arrays":
        return x
    return (x[i : i + 16] for i in (0, 16))


def test_nothing_printed_under_verbose_0(capfd):
    # No progress bar, no line (issue 24.7); in batches or not, data takes
    # the same path to the BatchNorm pass, the progress bar's only place.
    model, source, _, x = _trained("wrapper")
    swag_model, swag, _, _ = _trained("swag")
    for form in ("arrays", "generator"):
        capfd.readouterr()
        keras_swa.update_bn(model, _bn_data(form, x), verbose=0)
        keras_swa.assign_average(
            model, source, bn_data=_bn_data(form, x), verbose=0
        )
        with keras_swa.averaged_weights(
            model, source, bn_data=_bn_data(form, x), verbose=0
        ):
            pass
        with keras_swa.sampled_weights(
            swag_model, swag, bn_data=_bn_data(form, x)
        ):
            pass
        keras_swa.predict_bma(
            swag_model, x, swag, num_samples=1, bn_data=_bn_data(form, x)
        )
        captured = capfd.readouterr()
        assert (captured.out, captured.err) == ("", ""), form
