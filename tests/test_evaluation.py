"""`EvaluateAverage` and `AverageModelCheckpoint`: the average watched and
saved during `fit`, for every averager, with the training weights untouched.
"""

import keras
import numpy as np
import pytest

import keras_swa


def make_data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1)) + 0.1).astype("float32")
    return x, y


def make_model(optimizer, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=optimizer, loss="mse", metrics=["mae"])
    return model


def swa_optimizer():
    return keras_swa.SWA(
        keras.optimizers.SGD(0.02, momentum=0.9), start_averaging=2,
        average_period=3,
    )


def ema_optimizer():
    return keras_swa.EMA(keras.optimizers.SGD(0.02), decay=0.8)


def fit(model, callbacks, epochs=4):
    x, y = make_data()
    return model.fit(
        x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
        callbacks=callbacks,
    )


def raw_values(model):
    return [np.array(v.numpy()) for v in model.variables]


@pytest.mark.parametrize(
    "make_optimizer, prefix", [(swa_optimizer, "val_swa_"),
                               (ema_optimizer, "val_ema_")]
)
def test_logs_equal_averaged_weights_and_evaluate(make_optimizer, prefix):
    x, _ = make_data()
    validation = make_data(n=32, seed=1)
    model = make_model(make_optimizer())
    history = fit(
        model,
        [keras_swa.EvaluateAverage(validation, bn_data=(x,))],
    )
    logged = {
        name: values[-1]
        for name, values in history.history.items()
        if name.startswith(prefix)
    }
    assert set(logged) == {f"{prefix}loss", f"{prefix}mae"}

    with keras_swa.averaged_weights(model, bn_data=(x,), verbose=0):
        expected = model.evaluate(*validation, verbose=0, return_dict=True)
    for name, value in expected.items():
        np.testing.assert_allclose(logged[f"{prefix}{name}"], value,
                                   rtol=1e-5)


def test_training_is_untouched_by_evaluation_and_checkpoints(tmp_path):
    x, _ = make_data()
    validation = make_data(n=32, seed=1)
    plain = make_model(swa_optimizer())
    fit(plain, [])
    watched = make_model(swa_optimizer())
    fit(
        watched,
        [
            keras_swa.EvaluateAverage(validation, bn_data=(x,)),
            keras_swa.AverageModelCheckpoint(
                str(tmp_path / "avg_{epoch}.weights.h5"),
                save_weights_only=True, bn_data=(x,),
            ),
        ],
    )
    for a, b in zip(raw_values(plain), raw_values(watched)):
        np.testing.assert_array_equal(a, b)


def test_no_log_before_the_first_snapshot():
    validation = make_data(n=32, seed=1)
    model = make_model(
        keras_swa.SWA(keras.optimizers.SGD(0.02), start_averaging=6,
                      average_period=1)
    )
    # 3 updates an epoch: the first snapshot is update 6, in epoch 3.
    history = fit(model, [keras_swa.EvaluateAverage(validation)], epochs=4)
    assert len(history.history["val_swa_loss"]) == 2


def test_the_callback_as_source_and_early_stopping_on_its_metric():
    validation = make_data(n=32, seed=1)
    model = make_model(keras.optimizers.SGD(0.02))
    swa = keras_swa.StochasticWeightAveraging(start_epoch=1, verbose=0)
    stop = keras.callbacks.EarlyStopping(
        monitor="val_swa_loss", mode="min", patience=1, min_delta=1e9
    )
    history = fit(
        model,
        [swa, keras_swa.EvaluateAverage(validation, source=swa), stop],
        epochs=10,
    )
    # Averaging from epoch 1; the first logged value is the best, then one
    # epoch of patience: epochs 1 and 2 are logged, then it stops.
    assert len(history.history["loss"]) == 3
    assert len(history.history["val_swa_loss"]) == 2


def test_source_callback_after_the_evaluation_is_refused():
    validation = make_data(n=32, seed=1)
    model = make_model(keras.optimizers.SGD(0.02))
    swa = keras_swa.StochasticWeightAveraging(start_epoch=1, verbose=0)
    with pytest.raises(ValueError, match="Put EvaluateAverage after"):
        fit(model, [keras_swa.EvaluateAverage(validation, source=swa), swa])


def test_monitor_before_the_evaluation_is_refused():
    validation = make_data(n=32, seed=1)
    model = make_model(ema_optimizer())
    stop = keras.callbacks.EarlyStopping(monitor="val_ema_loss", mode="min")
    with pytest.raises(ValueError, match="Put EarlyStopping after"):
        fit(model, [stop, keras_swa.EvaluateAverage(validation)])


def test_bad_arguments():
    with pytest.raises(ValueError, match="validation_data"):
        keras_swa.EvaluateAverage(None)
    with pytest.raises(ValueError, match="validation_data"):
        keras_swa.EvaluateAverage((1, 2, 3, 4))
    with pytest.raises(TypeError, match="prefix"):
        keras_swa.EvaluateAverage(make_data(), prefix=3)
    with pytest.raises(ValueError, match="bn_steps"):
        keras_swa.AverageModelCheckpoint("a.keras", bn_steps=0)


@pytest.mark.parametrize("weights_only", [True, False])
def test_checkpoint_saves_the_averaged_model(tmp_path, weights_only):
    x, _ = make_data()
    model = make_model(ema_optimizer())
    suffix = ".weights.h5" if weights_only else ".keras"
    path = str(tmp_path / f"average{suffix}")
    fit(
        model,
        [keras_swa.AverageModelCheckpoint(
            path, save_weights_only=weights_only, bn_data=(x,))],
    )
    with keras_swa.averaged_weights(model, bn_data=(x,), verbose=0):
        expected = [np.array(v.numpy()) for v in model.weights]
    if weights_only:
        loaded = make_model(ema_optimizer(), seed=5)
        loaded.load_weights(path)
    else:
        loaded = keras.models.load_model(path)
    for variable, value in zip(loaded.weights, expected):
        np.testing.assert_allclose(variable.numpy(), value, rtol=1e-6)


def test_checkpoint_saves_nothing_before_the_first_snapshot(tmp_path):
    model = make_model(
        keras_swa.SWA(keras.optimizers.SGD(0.02), start_averaging=6,
                      average_period=1)
    )
    fit(
        model,
        [keras_swa.AverageModelCheckpoint(
            str(tmp_path / "{epoch}.weights.h5"), save_weights_only=True)],
    )
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["3.weights.h5", "4.weights.h5"]


def test_checkpoint_keeps_the_best_average(tmp_path):
    validation = make_data(n=32, seed=1)
    model = make_model(swa_optimizer())
    path = str(tmp_path / "best.weights.h5")
    recorded = []

    class RecordAverage(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if "val_swa_loss" in logs:
                with keras_swa.averaged_weights(self.model, verbose=0):
                    recorded.append(
                        (logs["val_swa_loss"],
                         [np.array(v.numpy()) for v in self.model.weights])
                    )

    fit(
        model,
        [
            keras_swa.EvaluateAverage(validation),
            RecordAverage(),
            keras_swa.AverageModelCheckpoint(
                path, monitor="val_swa_loss", mode="min",
                save_best_only=True, save_weights_only=True,
            ),
        ],
        epochs=6,
    )
    best = min(recorded, key=lambda entry: entry[0])[1]
    loaded = make_model(swa_optimizer(), seed=5)
    loaded.load_weights(path)
    for variable, value in zip(loaded.weights, best):
        np.testing.assert_allclose(variable.numpy(), value, rtol=1e-6)


def test_two_profiles_of_one_post_hoc_ema_log_under_distinct_keys():
    # Issue 21.10: both logged `val_ema_*`, the second overwrote the first.
    validation = make_data(n=32, seed=1)
    optimizer = keras_swa.PostHocEMA(
        keras.optimizers.SGD(0.02), sigma_rels=(0.05, 0.2)
    )
    model = make_model(optimizer)
    narrow, wide = optimizer.profiles
    history = fit(model, [keras_swa.EvaluateAverage(validation, source=narrow),
                          keras_swa.EvaluateAverage(validation, source=wide)],
                  epochs=2)
    logged = {}
    for profile in (narrow, wide):
        keys = [k for k in history.history
                if k.startswith(f"val_ema_{profile.sigma_rel:g}_")]
        assert keys, sorted(history.history)
        with keras_swa.averaged_weights(model, source=profile):
            logged[profile.sigma_rel] = model.evaluate(
                *validation, verbose=0, return_dict=True)["loss"]
        np.testing.assert_allclose(
            history.history[f"val_ema_{profile.sigma_rel:g}_loss"][-1],
            logged[profile.sigma_rel], rtol=1e-5)
    assert logged[0.05] != logged[0.2]


def test_two_evaluations_writing_the_same_keys_are_refused():
    validation = make_data(n=32, seed=1)
    model = make_model(ema_optimizer())
    with pytest.raises(ValueError, match="val_ema_"):
        fit(model, [keras_swa.EvaluateAverage(validation),
                    keras_swa.EvaluateAverage(make_data(n=16, seed=2))])


def test_a_prefix_that_would_overwrite_fits_own_logs_is_refused():
    # prefix="val_" would put the average's loss in `val_loss`, silently.
    x, y = make_data()
    validation = make_data(n=32, seed=1)
    model = make_model(ema_optimizer())
    with pytest.raises(ValueError, match=r"overwrite \['val_loss', 'val_mae'\]"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  validation_data=validation,
                  callbacks=[keras_swa.EvaluateAverage(validation,
                                                       prefix="val_")])


def _generator():
    x, y = make_data(n=32, seed=1)
    for start in range(0, 32, 8):
        yield x[start:start + 8], y[start:start + 8]


def test_single_use_or_infinite_validation_data_is_refused_before_training():
    # Issue 21.12 and 21.13: a generator is used up after the first epoch
    # (it crashed mid-training), an infinite dataset hung.
    cases = [_generator(), _Endless()]
    if keras.backend.backend() == "tensorflow" or _has_tensorflow():
        import tensorflow as tf

        cases.append(tf.data.Dataset.from_tensor_slices(make_data()).batch(8)
                     .repeat())
    for data in cases:
        with pytest.raises(ValueError, match="validation_data"):
            keras_swa.EvaluateAverage(data)
        with pytest.raises(ValueError, match="validation_data"):
            keras_swa.StochasticWeightAveraging(validation_data=data)


def _has_tensorflow():
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


class _Endless(keras.utils.PyDataset):
    """A PyDataset with no end (`num_batches` None)."""

    def __init__(self):
        super().__init__()

    @property
    def num_batches(self):
        return None

    def __getitem__(self, index):
        return make_data(n=8, seed=index)


def test_a_source_that_holds_no_average_is_refused_before_training():
    # Issue 21.14: it failed at the first epoch end.
    with pytest.raises(TypeError, match="source"):
        keras_swa.EvaluateAverage(make_data(), source=object())
    model = make_model(keras.optimizers.SGD(0.02))  # No averager.
    callback = keras_swa.EvaluateAverage(make_data(n=16))
    with pytest.raises(TypeError, match="source"):
        fit(model, [callback], epochs=1)
    assert model.optimizer.iterations.numpy() == 0


def test_early_stopping_on_the_average_does_not_warn_before_averaging():
    # Issue 24.6: EarlyStopping warned "metric ... not available" in every
    # epoch before averaging started.
    import warnings

    validation = make_data(n=32, seed=1)
    model = make_model(keras.optimizers.SGD(0.02))
    swa = keras_swa.StochasticWeightAveraging(start_epoch=2, verbose=0)
    stop = keras.callbacks.EarlyStopping(
        monitor="val_swa_loss", mode="min", patience=5
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(model, [swa, keras_swa.EvaluateAverage(
            validation, source=swa), stop], epochs=4)
        missing = keras.callbacks.EarlyStopping(monitor="val_typo_loss",
                                                mode="min")
        fit(model, [missing], epochs=1)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "val_swa_loss" in m], messages
    # The filter is scoped: a monitor nothing logs still warns.
    assert [m for m in messages if "val_typo_loss" in m], messages
    assert len(history.history["val_swa_loss"]) == 2


def test_early_stopping_on_the_callbacks_own_validation_logs_does_not_warn():
    # Issue 24.6, the SWA callback's own `validation_data` path.
    import warnings

    validation = make_data(n=32, seed=1)
    model = make_model(keras.optimizers.SGD(0.02))
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=2, verbose=0, validation_data=validation
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_swa_loss", mode="min", patience=5
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(model, [swa, stop], epochs=4)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "val_swa_loss" in m], messages
    assert len(history.history["val_swa_loss"]) == 2
