import importlib.util
import math
import os
import warnings

import keras
import numpy as np
import pytest

import keras_swa
from keras_swa.callbacks import BACKUP_FILENAME

EPOCH_LR = 0.05

# TensorFlow is an extra. The two tests that build a tf.data.Dataset import
# it themselves (the others need not pay for its import), and skip where it
# is not installed.
needs_tf = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None,
    reason="needs TensorFlow (tf.data)",
)


def to_numpy(variable):
    if isinstance(variable, np.ndarray):
        return variable
    # `ops.convert_to_numpy` of a TensorFlow variable warns under NumPy 2.
    return np.array(variable.numpy())


def make_model(batch_norm=False, optimizer=None, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((4,)), keras.layers.Dense(8, activation="relu")]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(1))
    model = keras.Sequential(layers)
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(EPOCH_LR, momentum=0.9),
        loss="mse",
        metrics=["mae"],
    )
    return model


def make_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1)) + 0.1).astype("float32")
    return x, y


def fit(model, callbacks, epochs, **kwargs):
    x, y = make_data()
    return model.fit(
        x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0,
        callbacks=callbacks, **kwargs,
    )


class Recorder(keras.callbacks.Callback):
    """Records the trainable weights at each epoch end and the learning rate
    each epoch trains with, independently of the callback under test."""

    def __init__(self):
        super().__init__()
        self.weights = {}
        self.learning_rates = {}
        self._epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            self.learning_rates[self._epoch] = float(
                self.model.optimizer.learning_rate
            )

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = [
            to_numpy(v) for v in self.model.trainable_variables
        ]

    def mean(self, epochs):
        return [
            np.mean([self.weights[e][i] for e in epochs], axis=0)
            for i in range(len(self.weights[epochs[0]]))
        ]


def assert_weights_close(actual, expected, rtol=1e-6, atol=1e-7):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(to_numpy(a), e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("window", [None, 1, 3])
def test_window_and_offload_of_the_epoch_end_weights(window):
    # Snapshots at epochs 1, 3, 5, 6 (the last, off the period): the mean
    # of the last `window` of them; offloaded or not, the same numbers, the
    # offloaded state in host memory.
    from tests.test_engine import _on_device
    from tests.test_engine import _placement

    results = {}
    for offload in (False, True):
        model = make_model()
        recorder = Recorder()
        swa = keras_swa.StochasticWeightAveraging(
            start_epoch=1, average_period=2, window=window, offload=offload,
            verbose=0,
        )
        fit(model, [recorder, swa], epochs=7)
        expected = recorder.mean([1, 3, 5, 6][-(window or 4):])
        assert int(swa.n_averaged) == 4
        assert_weights_close(swa.average_variables, expected)
        assert_weights_close(model.trainable_variables, expected)
        assert all(_on_device(v) for v in model.variables)
        rings = [r for r in swa._averages.rings or [] if r is not None]
        assert len(rings) == (len(expected) if window == 3 else 0)
        places = {_placement(v) for v in swa.average_variables + rings}
        if offload:
            assert places == {"host"}, places
        elif keras.backend.backend() == "jax":
            assert places == {"device"}, places
        results[offload] = [to_numpy(v) for v in model.trainable_variables]
    assert_weights_close(results[True], results[False])


@pytest.mark.parametrize(
    "start_epoch, average_period, epochs, averaged",
    [
        (3, 1, 6, [3, 4, 5]),
        (0.5, 1, 7, [3, 4, 5, 6]),
        (1, 2, 6, [1, 3, 5]),
        (1, 3, 7, [1, 4, 6]),  # the last epoch, off the period, too
        (0, 1, 2, [0, 1]),
    ],
)
def test_average_of_the_epoch_end_weights(
    start_epoch, average_period, epochs, averaged
):
    model = make_model()
    recorder = Recorder()
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=start_epoch, average_period=average_period, verbose=0
    )
    fit(model, [recorder, swa], epochs)
    expected = recorder.mean(averaged)
    assert int(swa.n_averaged) == len(averaged)
    assert_weights_close(swa.average_variables, expected)
    assert_weights_close(model.trainable_variables, expected)
    for average in swa.average_variables:
        assert not average.trainable
        assert average.dtype == "float32"


@pytest.mark.parametrize(
    "start_epoch, epochs, first",
    [(0.75, 40, 30), (0.29, 100, 29), (1.0, 5, 4), (0.1, 3, 0), (0.5, 1, 0)],
)
def test_fractional_start_epoch(start_epoch, epochs, first):
    # Driven through the callback hooks as `fit` calls them: a hundred real
    # epochs would only add time.
    model = make_model()
    swa = keras_swa.StochasticWeightAveraging(start_epoch=start_epoch,
                                              verbose=0)
    swa.set_model(model)
    swa.set_params({"epochs": epochs, "steps": 1, "verbose": 0})
    swa.on_train_begin()
    counts = []
    for epoch in range(epochs):
        swa.on_epoch_begin(epoch)
        swa.on_epoch_end(epoch, {})
        counts.append(int(swa.n_averaged))
    assert counts == [max(0, epoch - first + 1) for epoch in range(epochs)]


def test_last_epoch_folded_when_training_stops_early():
    class StopAt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 4:
                self.model.stop_training = True

    model = make_model()
    recorder = Recorder()
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=1, average_period=2, verbose=0
    )
    fit(model, [recorder, StopAt(), swa], epochs=10)
    assert int(swa.n_averaged) == 3
    assert_weights_close(model.trainable_variables, recorder.mean([1, 3, 4]))


def test_stopping_before_start_epoch_warns_and_keeps_weights():
    class StopAt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    model = make_model()
    recorder = Recorder()
    swa = keras_swa.StochasticWeightAveraging(start_epoch=3, verbose=0)
    with pytest.warns(UserWarning, match="averaged no epoch"):
        fit(model, [recorder, StopAt(), swa], epochs=5)
    assert_weights_close(model.trainable_variables, recorder.weights[0])


def reference_learning_rates(epochs, start, lr0, swa_lr, anneal, strategy):
    """torch SWALR stepped once per epoch from `start` on, in closed form."""
    rates = []
    for epoch in range(epochs):
        if epoch < start:
            rates.append(lr0)
            continue
        t = 1.0 if anneal == 0 else min(1.0, (epoch - start) / anneal)
        if strategy == "cos":
            alpha = (1 - math.cos(math.pi * t)) / 2
        else:
            alpha = t
        rates.append(swa_lr * alpha + lr0 * (1 - alpha))
    return rates


@pytest.mark.parametrize(
    "strategy, anneal_epochs",
    [("cos", 3), ("linear", 3), ("cos", 0), ("linear", 1)],
)
def test_learning_rate_annealing(strategy, anneal_epochs):
    model = make_model()
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=2, swa_lr=0.01, anneal_epochs=anneal_epochs,
        anneal_strategy=strategy, verbose=0,
    )
    recorder = Recorder()
    fit(model, [swa, recorder], epochs=6)
    expected = reference_learning_rates(
        6, 2, EPOCH_LR, 0.01, anneal_epochs, strategy
    )
    actual = [recorder.learning_rates[e] for e in range(6)]
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_hand_computed_learning_rates():
    model = make_model(optimizer=keras.optimizers.SGD(1.0))
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=1, swa_lr=0.0, anneal_epochs=2, verbose=0
    )
    recorder = Recorder()
    fit(model, [swa, recorder], epochs=5)
    np.testing.assert_allclose(
        [recorder.learning_rates[e] for e in range(5)],
        [1.0, 1.0, 0.5, 0.0, 0.0],
        atol=1e-7,
    )


def test_learning_rate_annealed_from_its_value_at_start_epoch():
    model = make_model()
    decay = keras.callbacks.LearningRateScheduler(
        lambda epoch, lr: 0.08 if epoch == 0 else 0.04 if epoch == 1 else lr
    )
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=2, swa_lr=0.01, anneal_epochs=2,
        anneal_strategy="linear", verbose=0,
    )
    recorder = Recorder()
    fit(model, [decay, swa, recorder], epochs=5)
    np.testing.assert_allclose(
        [recorder.learning_rates[e] for e in range(5)],
        [0.08, 0.04, 0.04, 0.025, 0.01],
        rtol=1e-6,
    )


def test_swa_lr_none_leaves_the_learning_rate_alone():
    model = make_model()
    swa = keras_swa.StochasticWeightAveraging(start_epoch=1, verbose=0)
    recorder = Recorder()
    fit(model, [swa, recorder], epochs=4)
    np.testing.assert_allclose(
        list(recorder.learning_rates.values()), [EPOCH_LR] * 4, rtol=1e-6
    )


def test_a_second_swa_phase_is_refused():
    # A SWALearningRate of the user's own, with another phase than swa_lr's.
    schedule = keras_swa.SWALearningRate(0.05, swa_start=4, swa_lr=0.02)
    model = make_model(optimizer=keras.optimizers.SGD(schedule))
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=1, swa_lr=0.01, verbose=0
    )
    with pytest.raises(ValueError, match="second one"):
        fit(model, [swa], epochs=3)
    # Without swa_lr the schedule is left to do its work.
    swa = keras_swa.StochasticWeightAveraging(start_epoch=1, verbose=0)
    fit(model, [swa], epochs=3)
    assert int(swa.n_averaged) == 2


def test_averaging_optimizer_needs_opting_in():
    def swa_model():
        return make_model(
            optimizer=keras_swa.SWA(keras.optimizers.SGD(0.05), 0, 1)
        )

    swa = keras_swa.StochasticWeightAveraging(start_epoch=1, verbose=0)
    with pytest.raises(ValueError, match="allow_averaging_optimizer"):
        fit(swa_model(), [swa], epochs=3)
    model = swa_model()
    recorder = Recorder()
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=1, swa_lr=0.01, verbose=0, allow_averaging_optimizer=True
    )
    fit(model, [recorder, swa], epochs=3)
    assert_weights_close(model.trainable_variables, recorder.mean([1, 2]))
    assert float(model.optimizer.inner_optimizer.learning_rate) == (
        pytest.approx(0.01)
    )


def test_assign_average_vars_protocol():
    model = make_model(batch_norm=True)
    swa = keras_swa.StochasticWeightAveraging(start_epoch=2, verbose=0)
    before = [to_numpy(v) for v in model.variables]
    with pytest.raises(ValueError, match="n_averaged=0"):
        swa.assign_average_vars(model.variables)
    assert_weights_close(model.variables, before, rtol=0, atol=0)

    recorder = Recorder()
    with pytest.warns(UserWarning, match="stale"):
        fit(model, [recorder, swa], epochs=4)
    trained = [to_numpy(v) for v in model.variables]
    for variable in model.trainable_variables:
        variable.assign(np.zeros(variable.shape))
    # Non-trainable variables (the BN statistics) have no average: untouched.
    swa.assign_average_vars(model.variables)
    assert_weights_close(model.trainable_variables, recorder.mean([2, 3]))
    trainable = {id(v) for v in model.trainable_variables}
    for variable, value in zip(model.variables, trained):
        if id(variable) not in trainable:
            np.testing.assert_array_equal(to_numpy(variable), value)
    assert len(swa.average_variables) == len(model.trainable_variables)


def test_mixed_precision_averages_in_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = make_model()
        assert isinstance(
            model.optimizer, keras.optimizers.LossScaleOptimizer
        )
        recorder = Recorder()
        swa = keras_swa.StochasticWeightAveraging(
            start_epoch=1, swa_lr=0.01, verbose=0
        )
        fit(model, [recorder, swa], epochs=3)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for average in swa.average_variables:
        assert average.dtype == "float32"
    assert_weights_close(model.trainable_variables, recorder.mean([1, 2]))
    inner = model.optimizer.inner_optimizer
    assert float(inner.learning_rate) == pytest.approx(0.01)


def test_verbose_prints_start_and_snapshots(capsys):
    model = make_model()
    swa = keras_swa.StochasticWeightAveraging(start_epoch=1, verbose=1)
    fit(model, [swa], epochs=3)
    out = capsys.readouterr().out
    assert "Epoch 2: StochasticWeightAveraging starts" in out
    assert "n_averaged=2" in out


class InterruptAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("Interrupted")


@pytest.mark.parametrize(
    "swa_first, schedule, window",
    [(False, False, None), (True, False, None), (False, True, None),
     (False, False, 2)],
)
def test_resume_gives_the_uninterrupted_average(
    tmp_path, swa_first, schedule, window
):
    def run(directory, interrupt_at=None):
        model = schedule_model() if schedule else make_model()
        swa = keras_swa.StochasticWeightAveraging(
            start_epoch=2, swa_lr=0.01, anneal_epochs=3, average_period=2,
            backup_dir=directory / "swa", verbose=0, window=window,
        )
        backup = keras.callbacks.BackupAndRestore(str(directory / "fit"))
        callbacks = [swa, backup] if swa_first else [backup, swa]
        if interrupt_at is not None:
            callbacks.append(InterruptAt(interrupt_at))
        fit(model, callbacks, epochs=8)
        return model, swa

    reference, reference_swa = run(tmp_path / "reference")

    with pytest.raises(RuntimeError, match="Interrupted"):
        run(tmp_path / "resumed", interrupt_at=3)
    assert os.path.exists(tmp_path / "resumed" / "swa" / BACKUP_FILENAME)
    with pytest.raises(RuntimeError, match="Interrupted"):
        run(tmp_path / "resumed", interrupt_at=6)
    model, swa = run(tmp_path / "resumed")

    assert int(swa.n_averaged) == int(reference_swa.n_averaged) == 4
    assert_weights_close(
        model.trainable_variables, reference.trainable_variables,
        rtol=1e-6, atol=1e-7,
    )
    assert os.listdir(tmp_path / "resumed" / "swa") == []


def test_stale_backup_without_restored_epoch_is_refused(tmp_path):
    def swa():
        return keras_swa.StochasticWeightAveraging(
            start_epoch=1, backup_dir=tmp_path, verbose=0
        )

    with pytest.raises(RuntimeError, match="Interrupted"):
        fit(make_model(), [swa(), InterruptAt(2)], epochs=5)
    with pytest.raises(ValueError, match="BackupAndRestore"):
        fit(make_model(), [swa()], epochs=5)


def test_backup_of_another_model_is_refused(tmp_path):
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=1, backup_dir=tmp_path, verbose=0
    )
    with pytest.raises(RuntimeError, match="Interrupted"):
        fit(make_model(), [swa, InterruptAt(1)], epochs=5)
    with pytest.raises(ValueError, match="do not match this model"):
        fit(make_model(batch_norm=True), [swa], epochs=5)


def test_start_epoch_past_the_last_epoch():
    swa = keras_swa.StochasticWeightAveraging(start_epoch=5, verbose=0)
    with pytest.raises(ValueError, match="start_epoch.*epochs=5"):
        fit(make_model(), [swa], epochs=5)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(start_epoch=-1), ValueError, "start_epoch"),
        (dict(start_epoch=0.0), ValueError, "start_epoch"),
        (dict(start_epoch=1.5), ValueError, "start_epoch"),
        (dict(start_epoch=True), TypeError, "start_epoch"),
        (dict(start_epoch="3"), TypeError, "start_epoch"),
        (dict(swa_lr=-0.1), ValueError, "swa_lr"),
        (dict(swa_lr="0.1"), TypeError, "swa_lr"),
        (dict(anneal_epochs=-1), ValueError, "anneal_epochs"),
        (dict(anneal_epochs=1.5), TypeError, "anneal_epochs"),
        (dict(anneal_strategy="cosine"), ValueError, "anneal_strategy"),
        (dict(average_period=0), ValueError, "average_period"),
        (dict(window=0), ValueError, "window"),
        (dict(window=2.5), TypeError, "window"),
        (dict(offload="yes"), TypeError, "offload"),
        (dict(bn_steps=0), ValueError, "bn_steps"),
        (dict(validation_data=(1, 2, 3, 4)), ValueError, "validation_data"),
        (dict(backup_dir=3), TypeError, "backup_dir"),
    ],
)
def test_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        keras_swa.StochasticWeightAveraging(**kwargs)


class FullRecorder(keras.callbacks.Callback):
    """Records every model variable (BN statistics included) at epoch ends."""

    def __init__(self):
        super().__init__()
        self.variables = []

    def on_epoch_end(self, epoch, logs=None):
        self.variables.append([to_numpy(v) for v in self.model.variables])


def test_val_swa_logs_evaluate_the_average():
    x_val, y_val = make_data(n=8, seed=1)
    model = make_model()
    recorder = Recorder()
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=1, average_period=2, validation_data=(x_val, y_val),
        verbose=0,
    )
    history = fit(model, [recorder, swa], epochs=5)
    logged = history.history
    # Averaging epochs 1, 3 and 4 (the last): one entry each.
    assert len(logged["val_swa_loss"]) == len(logged["val_swa_mae"]) == 3
    assert len(logged["loss"]) == 5

    reference = make_model()
    for epochs, value in zip([[1], [1, 3], [1, 3, 4]], logged["val_swa_loss"]):
        for variable, average in zip(
            reference.trainable_variables, recorder.mean(epochs)
        ):
            variable.assign(average)
        expected = reference.evaluate(x_val, y_val, verbose=0)[0]
        assert value == pytest.approx(expected, rel=1e-5)


def test_validation_leaves_training_undisturbed():
    x_val, y_val = make_data(n=8, seed=1)
    x_bn, _ = make_data(n=12, seed=2)

    def run(validation_data):
        model = make_model(batch_norm=True)
        recorder = FullRecorder()
        swa = keras_swa.StochasticWeightAveraging(
            start_epoch=1, swa_lr=0.01, validation_data=validation_data,
            bn_data=x_bn, verbose=0,
        )
        history = fit(model, [recorder, swa], epochs=4)
        return recorder, swa, history

    plain, plain_swa, _ = run(None)
    validated, validated_swa, history = run((x_val, y_val))
    assert len(history.history["val_swa_loss"]) == 3
    for plain_epoch, validated_epoch in zip(
        plain.variables, validated.variables
    ):
        for a, b in zip(plain_epoch, validated_epoch):
            np.testing.assert_array_equal(a, b)
    assert int(plain_swa.n_averaged) == int(validated_swa.n_averaged) == 3
    for a, b in zip(
        plain_swa.average_variables, validated_swa.average_variables
    ):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


@needs_tf
def test_validation_data_as_a_dataset():
    import tensorflow as tf

    x_val, y_val = make_data(n=8, seed=1)
    dataset = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(4)
    model = make_model()
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=2, validation_data=dataset, verbose=0
    )
    history = fit(model, [swa], epochs=3)
    # At the end of fit the model holds the last average evaluated.
    expected = model.evaluate(dataset, verbose=0)[0]
    assert history.history["val_swa_loss"][-1] == pytest.approx(
        expected, rel=1e-5
    )


def test_batch_norm_statistics_recomputed_for_the_average():
    x_bn, _ = make_data(n=12, seed=2)
    model = make_model(batch_norm=True)
    recorder = Recorder()
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=2, bn_data=x_bn, verbose=0
    )
    fit(model, [recorder, swa], epochs=4)
    kernel, bias = recorder.mean([2, 3])[:2]
    # One batch of 12: the statistics are its mean and biased variance.
    hidden = np.maximum(x_bn @ kernel + bias, 0.0)
    batch_norm = model.layers[1]
    np.testing.assert_allclose(
        to_numpy(batch_norm.moving_mean), hidden.mean(axis=0),
        rtol=1e-5, atol=1e-6,
    )
    np.testing.assert_allclose(
        to_numpy(batch_norm.moving_variance), hidden.var(axis=0),
        rtol=1e-4, atol=1e-6,
    )


def test_batch_norm_without_bn_data_warns():
    model = make_model(batch_norm=True)
    swa = keras_swa.StochasticWeightAveraging(start_epoch=1, verbose=0)
    with pytest.warns(UserWarning, match="stale.*bn_data"):
        fit(model, [swa], epochs=2)


def test_frozen_batch_norm_does_not_warn(recwarn):
    model = make_model(batch_norm=True)
    model.layers[1].trainable = False
    model.compile(optimizer=keras.optimizers.SGD(EPOCH_LR), loss="mse")
    swa = keras_swa.StochasticWeightAveraging(start_epoch=1, verbose=0)
    fit(model, [swa], epochs=2)
    assert not [w for w in recwarn if "stale" in str(w.message)]


def test_weights_utilities_accept_the_callback():
    model = make_model()
    recorder = Recorder()
    swa = keras_swa.StochasticWeightAveraging(start_epoch=1, verbose=0)
    fit(model, [recorder, swa], epochs=3)
    raw = recorder.weights[2]
    for variable, value in zip(model.trainable_variables, raw):
        variable.assign(value)
    with keras_swa.averaged_weights(model, source=swa):
        assert_weights_close(model.trainable_variables, recorder.mean([1, 2]))
    assert_weights_close(model.trainable_variables, raw, rtol=0, atol=0)
    keras_swa.assign_average(model, source=swa)
    assert_weights_close(model.trainable_variables, recorder.mean([1, 2]))


# ---------------------------------------------------------------------------
# Living with the rest of Keras: other callbacks in any order, schedules


def constant_scheduler(rate):
    return keras.callbacks.LearningRateScheduler(lambda epoch, lr: rate)


@pytest.mark.parametrize("scheduler_first", [False, True])
def test_learning_rate_scheduler_in_either_order(scheduler_first):
    model = make_model()
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=2, swa_lr=0.001, anneal_epochs=2, verbose=0
    )
    scheduler = constant_scheduler(0.05)
    recorder = Recorder()
    callbacks = [scheduler, swa] if scheduler_first else [swa, scheduler]
    fit(model, callbacks + [recorder], epochs=6)
    expected = reference_learning_rates(6, 2, 0.05, 0.001, 2, "cos")
    actual = [recorder.learning_rates[e] for e in range(6)]
    np.testing.assert_allclose(actual, expected, rtol=1e-6)

    # The compiled step trained with those rates: the raw weights of the
    # last epoch are those of a run whose scheduler gives them directly.
    reference = make_model()
    reference_recorder = Recorder()
    fit(
        reference,
        [keras.callbacks.LearningRateScheduler(lambda e, lr: expected[e]),
         reference_recorder],
        epochs=6,
    )
    assert_weights_close(recorder.weights[5], reference_recorder.weights[5])


def schedule_model():
    schedule = keras.optimizers.schedules.CosineDecay(0.05, decay_steps=12)
    return make_model(optimizer=keras.optimizers.SGD(schedule, momentum=0.9))


def test_learning_rate_schedule_hands_over_to_swa_lr():
    # 16 samples in batches of 8: 2 steps per epoch.
    model = schedule_model()
    base = model.optimizer._learning_rate
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=3, swa_lr=0.002, anneal_epochs=1, verbose=0
    )
    recorder = Recorder()
    fit(model, [swa, recorder], epochs=6)

    # The same training with the expected per-step rates given directly.
    reference = make_model(
        optimizer=keras.optimizers.SGD(
            keras_swa.SWALearningRate(
                keras.optimizers.schedules.CosineDecay(0.05, decay_steps=12),
                swa_start=6, swa_lr=0.002, anneal_steps=2,
            ),
            momentum=0.9,
        )
    )
    reference_recorder = Recorder()
    fit(reference, [reference_recorder], epochs=6)
    for epoch in range(6):
        assert_weights_close(
            recorder.weights[epoch], reference_recorder.weights[epoch]
        )
    # Without the hand-over the weights differ (the test can fail).
    plain = schedule_model()
    plain_recorder = Recorder()
    fit(plain, [plain_recorder], epochs=6)
    assert not np.allclose(plain_recorder.weights[5][0], recorder.weights[5][0])
    # The model averaged epochs 3..5, and the schedule is given back.
    assert_weights_close(model.trainable_variables, recorder.mean([3, 4, 5]))
    assert model.optimizer._learning_rate is base


@needs_tf
def test_learning_rate_schedule_without_known_steps_is_refused():
    import tensorflow as tf

    model = schedule_model()
    x, y = make_data()
    # A generator-backed dataset of unknown length.
    data = tf.data.Dataset.from_generator(
        lambda: iter([(x[:8], y[:8]), (x[8:], y[8:])]),
        output_signature=(
            tf.TensorSpec((None, 4), "float32"),
            tf.TensorSpec((None, 1), "float32"),
        ),
    )
    swa = keras_swa.StochasticWeightAveraging(start_epoch=1, swa_lr=0.01)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        model.fit(data, epochs=3, verbose=0, callbacks=[swa])
    assert int(model.optimizer.iterations.numpy()) == 0


def test_early_stopping_restoring_after_the_callback_is_refused():
    model = make_model()
    swa = keras_swa.StochasticWeightAveraging(start_epoch=1, verbose=0)
    stop = keras.callbacks.EarlyStopping(
        monitor="loss", patience=1, restore_best_weights=True
    )
    before = [to_numpy(v) for v in model.trainable_variables]
    with pytest.raises(ValueError, match="Put EarlyStopping before"):
        fit(model, [swa, stop], epochs=4)
    assert int(model.optimizer.iterations.numpy()) == 0
    assert_weights_close(model.trainable_variables, before, rtol=0, atol=0)


def test_early_stopping_restoring_before_the_callback_keeps_the_average():
    model = make_model()
    stop = keras.callbacks.EarlyStopping(
        monitor="loss", patience=1, restore_best_weights=True
    )
    swa = keras_swa.StochasticWeightAveraging(start_epoch=1, verbose=0)
    recorder = Recorder()
    fit(model, [stop, swa, recorder], epochs=4)
    assert_weights_close(
        model.trainable_variables, recorder.mean([1, 2, 3])
    )


def test_a_monitor_before_the_val_swa_logs_is_refused():
    model = make_model()
    x, y = make_data(seed=1)
    stop = keras.callbacks.EarlyStopping(monitor="val_swa_loss", patience=1)
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=1, validation_data=(x, y), verbose=0
    )
    with pytest.raises(ValueError, match="Put EarlyStopping after"):
        fit(model, [stop, swa], epochs=4)


def test_early_stopping_on_val_swa_after_the_callback():
    model = make_model()
    x, y = make_data(seed=1)
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=0, validation_data=(x, y), verbose=0
    )
    # With an impossible improvement threshold it stops after `patience`
    # epochs of val_swa_loss, which it must therefore see.
    stop = keras.callbacks.EarlyStopping(
        monitor="val_swa_loss", mode="min", patience=2, min_delta=1e9
    )
    history = fit(model, [swa, stop], epochs=10)
    assert len(history.history["val_swa_loss"]) == 3
    assert int(swa.n_averaged.numpy()) == 3


# ---------------------------------------------------------------------------
# Issue 21: a divergence resumed, the schedule placed for this fit, the rate
# visible from epoch begin, a custom training loop


class NaNAt(keras.callbacks.Callback):
    """Puts NaN into the first kernel at the end of one epoch (a transient
    divergence); `Heal`, later in the list, puts the weights back."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch
        self.saved = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            variable = self.model.trainable_variables[0]
            self.saved = to_numpy(variable)
            variable.assign(np.full(variable.shape, np.nan, "float32"))


class Heal(keras.callbacks.Callback):
    def __init__(self, spike):
        super().__init__()
        self.spike = spike

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.spike.epoch:
            self.model.trainable_variables[0].assign(self.spike.saved)


def test_a_divergence_survives_a_resume(tmp_path):
    # A snapshot skipped as non-finite in the first fit: the resumed fit
    # must still know it, keep the backup and say so, as an uninterrupted
    # fit does.
    def run(directory, interrupt_at=None):
        model = make_model()
        spike = NaNAt(2)
        swa = keras_swa.StochasticWeightAveraging(
            start_epoch=1, backup_dir=directory / "swa", verbose=0
        )
        callbacks = [
            spike, swa, Heal(spike),
            keras.callbacks.BackupAndRestore(str(directory / "fit")),
        ]
        if interrupt_at is not None:
            callbacks.append(InterruptAt(interrupt_at))
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always", UserWarning)
            fit(model, callbacks, epochs=6)
        return model, swa, [str(w.message) for w in warned]

    reference, reference_swa, messages = run(tmp_path / "reference")
    assert any("skipped this epoch's snapshot" in m for m in messages)
    assert any("keeps its backup" in m for m in messages)
    with pytest.raises(RuntimeError, match="Interrupted"):
        run(tmp_path / "resumed", interrupt_at=3)
    model, swa, messages = run(tmp_path / "resumed")
    assert any("keeps its backup" in m for m in messages), messages
    assert os.path.exists(tmp_path / "resumed" / "swa" / BACKUP_FILENAME)
    with np.load(tmp_path / "resumed" / "swa" / BACKUP_FILENAME) as state:
        assert bool(state["diverged"])
    # Epochs 1, 3, 4, 5: the skipped epoch 2 is in neither average.
    assert int(swa.n_averaged) == int(reference_swa.n_averaged) == 4
    assert_weights_close(
        model.trainable_variables, reference.trainable_variables
    )


def schedule_swa(start_epoch, **kwargs):
    return keras_swa.StochasticWeightAveraging(
        start_epoch=start_epoch, swa_lr=0.002, anneal_epochs=1, verbose=0,
        **kwargs,
    )


def phase_schedule(swa_start):
    """`schedule_model`'s schedule with the SWA phase written directly."""
    return keras_swa.SWALearningRate(
        keras.optimizers.schedules.CosineDecay(0.05, decay_steps=12),
        swa_start=swa_start, swa_lr=0.002, anneal_steps=2,
    )


@pytest.mark.parametrize(
    "first_epochs, initial_epoch, start_epoch, swa_start",
    [
        # A second fit: its epoch 1 begins at step 2 * 2 + 1 * 2.
        (2, 0, 1, 6),
        # initial_epoch=2 with a fresh optimizer: epoch 3 begins at step 2.
        (0, 2, 3, 2),
        # initial_epoch past start_epoch with a fresh optimizer: the phase
        # cannot begin before the optimizer's first step, so it begins there.
        (0, 4, 3, 0),
        # Both: the first fit made 4 real steps; epoch 3 of the second fit,
        # which begins at epoch 4 (step 4), began one epoch earlier: step 2.
        (2, 4, 3, 2),
    ],
)
def test_schedule_phase_placed_where_this_fit_reaches_start_epoch(
    first_epochs, initial_epoch, start_epoch, swa_start
):
    # 16 samples in batches of 8: 2 steps per epoch.
    def run(model, callbacks):
        if first_epochs:
            fit(model, [], epochs=first_epochs)
        recorder = Recorder()
        fit(model, callbacks + [recorder], epochs=6,
            initial_epoch=initial_epoch)
        return recorder

    model = schedule_model()
    recorder = run(model, [schedule_swa(start_epoch)])
    # The rate of each epoch's first step is the phase's, placed by hand.
    expected = phase_schedule(swa_start)
    for epoch in range(initial_epoch, 6):
        step = 2 * first_epochs + 2 * (epoch - initial_epoch)
        assert recorder.learning_rates[epoch] == pytest.approx(
            float(expected(step)), rel=1e-6
        )
    assert recorder.learning_rates[5] == pytest.approx(0.002)
    if swa_start >= 2 * first_epochs:
        # The same training with the phase placed by hand (where the first
        # fit ran before the phase, so that the reference can run it too).
        reference = run(
            make_model(
                optimizer=keras.optimizers.SGD(
                    phase_schedule(swa_start), momentum=0.9
                )
            ),
            [],
        )
        for epoch in range(initial_epoch, 6):
            assert_weights_close(
                recorder.weights[epoch], reference.weights[epoch]
            )


class EpochRates(keras.callbacks.Callback):
    """The learning rate each epoch begins and ends with."""

    def __init__(self):
        super().__init__()
        self.begin = {}
        self.end = {}

    def _rate(self):
        return float(self.model.optimizer.learning_rate)

    def on_epoch_begin(self, epoch, logs=None):
        self.begin[epoch] = self._rate()

    def on_epoch_end(self, epoch, logs=None):
        self.end[epoch] = self._rate()


@pytest.mark.parametrize("scheduler", [None, "before", "after"])
def test_rate_visible_from_epoch_begin_and_held(scheduler):
    model = make_model()
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=2, swa_lr=0.001, anneal_epochs=2, verbose=0
    )
    callbacks = [swa]
    if scheduler == "before":
        callbacks.insert(0, constant_scheduler(EPOCH_LR))
    elif scheduler == "after":
        callbacks.append(constant_scheduler(EPOCH_LR))
    rates = EpochRates()
    recorder = Recorder()
    fit(model, callbacks + [rates, recorder], epochs=6)
    expected = reference_learning_rates(6, 2, EPOCH_LR, 0.001, 2, "cos")
    for seen in (recorder.learning_rates, rates.end):
        np.testing.assert_allclose(
            [seen[e] for e in range(6)], expected, rtol=1e-6
        )
    if scheduler != "after":
        # A callback after the SWA one sees the epoch's rate at its
        # `on_epoch_begin` (one after a scheduler sees the scheduler's).
        np.testing.assert_allclose(
            [rates.begin[e] for e in range(6)], expected, rtol=1e-6
        )


def test_custom_training_loop_without_epochs():
    model = make_model()
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=1, average_period=2, swa_lr=0.01, verbose=0
    )
    # A custom loop's CallbackList: no `epochs` (nor `steps`) in params.
    callbacks = keras.callbacks.CallbackList([swa], model=model)
    x, y = make_data()
    weights = {}
    callbacks.on_train_begin()
    for epoch in range(5):
        callbacks.on_epoch_begin(epoch)
        # Set at epoch begin: the loop need not call the batch hooks.
        expected_rate = EPOCH_LR if epoch < 1 else 0.01
        assert float(model.optimizer.learning_rate) == pytest.approx(
            expected_rate
        )
        for batch in range(2):
            model.train_on_batch(x[8 * batch : 8 * batch + 8],
                                 y[8 * batch : 8 * batch + 8])
        callbacks.on_epoch_end(epoch, {})
        weights[epoch] = [to_numpy(v) for v in model.trainable_variables]
    callbacks.on_train_end()
    # Epochs 1 and 3 (average_period), and the last one run, 4, which
    # `on_train_end` folds in: without `epochs` it was not known earlier.
    assert int(swa.n_averaged) == 3
    expected = [
        np.mean([weights[e][i] for e in (1, 3, 4)], axis=0)
        for i in range(len(weights[0]))
    ]
    assert_weights_close(model.trainable_variables, expected)


def test_fractional_start_epoch_without_epochs_is_refused():
    model = make_model()
    swa = keras_swa.StochasticWeightAveraging(start_epoch=0.5, verbose=0)
    callbacks = keras.callbacks.CallbackList([swa], model=model)
    with pytest.raises(ValueError, match="start_epoch=0.5.*epochs"):
        callbacks.on_train_begin()


def test_schedule_phase_counts_real_updates_with_accumulation():
    # Batches of 4 accumulated two by two are the updates of batches of 8:
    # the SWA phase (2 updates per epoch) must land on the same updates.
    def run(batch_size, accumulation):
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
            [10**6], [EPOCH_LR, EPOCH_LR]
        )
        model = make_model(
            optimizer=keras.optimizers.SGD(
                schedule, momentum=0.9,
                gradient_accumulation_steps=accumulation,
            )
        )
        recorder = Recorder()
        x, y = make_data()
        model.fit(
            x, y, batch_size=batch_size, epochs=4, shuffle=False, verbose=0,
            callbacks=[
                keras_swa.StochasticWeightAveraging(
                    start_epoch=1, swa_lr=0.002, anneal_epochs=2,
                    anneal_strategy="linear", verbose=0,
                ),
                recorder,
            ],
        )
        return recorder

    accumulated = run(4, 2)
    reference = run(8, None)
    for epoch in range(4):
        assert_weights_close(
            accumulated.weights[epoch], reference.weights[epoch],
            rtol=1e-5, atol=1e-6,
        )


def test_float64_callback_average_is_float64_accurate():
    # Issue 21.7 for the callback: the rule's weight was float32 (1/3 and
    # friends rounded), 1e-9-relative errors on float64 weights.

    from tests.test_averaging import float64_enabled

    with float64_enabled():
        keras.config.set_dtype_policy("float64")
        model = make_model()
        rng = np.random.default_rng(0)
        snapshots = [
            [1.0 + rng.standard_normal(v.shape) / 3.0
             for v in model.trainable_variables]
            for _ in range(7)
        ]

        class SetWeights(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                for variable, value in zip(
                    self.model.trainable_variables, snapshots[epoch]
                ):
                    variable.assign(value)

        swa = keras_swa.StochasticWeightAveraging(start_epoch=0, verbose=0)
        fit(model, [SetWeights(), swa], epochs=7)
        for average, values in zip(swa.average_variables, zip(*snapshots)):
            assert keras.backend.standardize_dtype(average.dtype) == "float64"
            np.testing.assert_allclose(
                to_numpy(average), np.mean(values, axis=0), rtol=1e-13
            )
