"""Bayesian model averaging with SWAG samples: `sampled_weights` and
`predict_bma`, against predictions computed sample by sample, on every
backend."""

import keras
import numpy as np
import pytest

import keras_swa
from keras_swa import batch_norm


def make_data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("int32") + (x[:, 2] > 1)
    return x, y


def trained(num_classes=3, batch_norm=True, seed=0, max_rank=3):
    """A small classifier trained with SWAG (BatchNorm recomputed at the
    end), that outputs logits."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((4,)), keras.layers.Dense(8, activation="relu")]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(num_classes))
    model = keras.Sequential(layers)
    loss = (
        keras.losses.BinaryCrossentropy(from_logits=True)
        if num_classes == 1
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    x, y = make_data()
    if num_classes == 1:
        y = (y > 0).astype("float32")
    swag = keras_swa.SWAG(
        start_epoch=2, max_rank=max_rank, bn_data=x if batch_norm else None,
        verbose=0,
    )
    model.fit(x, y, batch_size=8, epochs=6, verbose=0, callbacks=[swag])
    return model, swag, x


def state(model):
    return [np.array(v.numpy()) for v in model.variables]


def assert_same_state(model, before):
    for variable, value in zip(model.variables, before):
        np.testing.assert_array_equal(variable.numpy(), value)


def softmax(logits):
    logits = logits.astype("float64")
    exponentials = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def test_scale_zero_is_the_swa_prediction():
    model, swag, x = trained()
    # Disturb the statistics, so that only a recomputation gives them back.
    for variable in batch_norm.statistics_variables(model):
        variable.assign(np.full(variable.shape, 0.5, "float32"))
    with keras_swa.averaged_weights(model, source=swag, bn_data=x):
        expected = softmax(model.predict(x, verbose=0))
    probabilities = keras_swa.predict_bma(
        model, x, source=swag, num_samples=4, scale=0.0, bn_data=x,
        from_logits=True,
    )
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, expected, rtol=1e-6, atol=1e-7)


def test_mean_of_the_sampled_models_and_model_unchanged():
    model, swag, x = trained()
    before = state(model)
    probabilities = keras_swa.predict_bma(
        model, x, source=swag, num_samples=3, scale=0.5, seed=10, bn_data=x,
        bn_steps=2, from_logits=True,
    )
    assert_same_state(model, before)

    # Sample k is that of sampled_weights with seed 10 + k, BN recomputed on
    # the first 2 batches.
    expected = []
    for k in range(3):
        with keras_swa.sampled_weights(
            model, swag, scale=0.5, seed=10 + k, bn_data=x, bn_steps=2
        ):
            expected.append(softmax(model.predict(x, verbose=0)))
    np.testing.assert_allclose(
        probabilities, np.mean(expected, axis=0), rtol=1e-5, atol=1e-6
    )
    # A distribution per row, different from the SWA mean's.
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)
    swa = keras_swa.predict_bma(
        model, x, source=swag, scale=0.0, bn_data=x, from_logits=True
    )
    assert np.abs(probabilities - swa).max() > 1e-4
    # Reproducible for a seed, not across seeds.
    again = keras_swa.predict_bma(
        model, x, source=swag, num_samples=3, scale=0.5, seed=10, bn_data=x,
        bn_steps=2, from_logits=True,
    )
    np.testing.assert_array_equal(probabilities, again)
    other = keras_swa.predict_bma(
        model, x, source=swag, num_samples=3, scale=0.5, seed=11, bn_data=x,
        bn_steps=2, from_logits=True,
    )
    assert not np.allclose(probabilities, other)
    assert_same_state(model, before)


def test_single_unit_logits_go_through_a_sigmoid():
    model, swag, x = trained(num_classes=1, batch_norm=False)
    probabilities = keras_swa.predict_bma(
        model, x, source=swag, num_samples=2, seed=0, from_logits=True
    )
    expected = []
    for k in range(2):
        with keras_swa.sampled_weights(model, swag, seed=k):
            logits = model.predict(x, verbose=0).astype("float64")
        expected.append(1.0 / (1.0 + np.exp(-logits)))
    assert probabilities.shape == (len(x), 1)
    np.testing.assert_allclose(
        probabilities, np.mean(expected, axis=0), rtol=1e-5, atol=1e-6
    )


def test_probabilities_averaged_as_they_are():
    model, swag, x = trained(batch_norm=False)
    probabilities = keras_swa.predict_bma(
        model, x, source=swag, num_samples=2, seed=5, batch_size=7
    )
    expected = []
    for k in range(2):
        with keras_swa.sampled_weights(model, swag, seed=5 + k):
            expected.append(model.predict(x, verbose=0))
    np.testing.assert_allclose(
        probabilities, np.mean(expected, axis=0), rtol=1e-5, atol=1e-6
    )


def test_sampled_weights_swaps_a_sample_in_and_back():
    model, swag, x = trained()
    before = state(model)
    with keras_swa.sampled_weights(model, swag, scale=0.4, seed=3, bn_data=x):
        inside_weights = [np.array(v.numpy()) for v in model.trainable_variables]
        inside_statistics = [
            np.array(v.numpy())
            for v in batch_norm.statistics_variables(model)
        ]
    assert_same_state(model, before)
    for actual, expected in zip(
        inside_weights, swag.sample(scale=0.4, seed=3)
    ):
        np.testing.assert_array_equal(actual, expected)
    # The statistics are those update_bn computes for the sample.
    for variable, value in zip(
        model.trainable_variables, swag.sample(scale=0.4, seed=3)
    ):
        variable.assign(value)
    keras_swa.update_bn(model, x, verbose=0)
    for variable, value in zip(
        batch_norm.statistics_variables(model), inside_statistics
    ):
        np.testing.assert_allclose(variable.numpy(), value, rtol=1e-6, atol=1e-7)


def test_state_restored_on_error():
    model, swag, x = trained()
    before = state(model)
    with pytest.raises(RuntimeError, match="in the block"):
        with keras_swa.sampled_weights(model, swag, seed=1, bn_data=x):
            raise RuntimeError("in the block")
    assert_same_state(model, before)
    # Inputs of the wrong shape fail in `predict`, after a sample was in.
    with pytest.raises(Exception):
        keras_swa.predict_bma(
            model, np.zeros((4, 7), "float32"), source=swag, num_samples=2,
            bn_data=x,
        )
    assert_same_state(model, before)


def test_batch_norm_without_bn_data_warns():
    model, swag, x = trained()
    with pytest.warns(UserWarning, match="pass `bn_data`"):
        keras_swa.predict_bma(model, x, source=swag, num_samples=1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_samples": 0}, ValueError, "`num_samples`.*Received: num_samples=0"),
        ({"num_samples": 2.0}, TypeError, "`num_samples`"),
        ({"scale": -1.0}, ValueError, "`scale`"),
        ({"seed": "a"}, TypeError, "`seed`"),
        ({"batch_size": 0}, ValueError, "`batch_size`"),
        ({"from_logits": 1}, TypeError, "`from_logits`"),
        ({"bn_steps": 2}, ValueError, "`bn_steps` is given but `bn_data` is None"),
        ({"source": "swag"}, TypeError, "`source` must be a `keras_swa.SWAG`"),
        (
            {"source": keras_swa.StochasticWeightAveraging()},
            TypeError,
            "`source` must be a `keras_swa.SWAG`",
        ),
    ],
)
def test_bad_arguments_change_nothing(kwargs, error, match):
    model, swag, x = trained(batch_norm=False)
    before = state(model)
    arguments = {"source": swag, **kwargs}
    with pytest.raises(error, match=match):
        keras_swa.predict_bma(model, x, **arguments)
    assert_same_state(model, before)


def test_swag_of_another_model_or_without_snapshot_is_refused():
    model, swag, x = trained(batch_norm=False)
    other, _, _ = trained(batch_norm=False, seed=1)
    with pytest.raises(ValueError, match="posterior of another model"):
        keras_swa.predict_bma(other, x, source=swag)
    with pytest.raises(ValueError, match="posterior of another model"):
        with keras_swa.sampled_weights(other, swag):
            pass
    with pytest.raises(ValueError, match="no snapshot yet"):
        with keras_swa.sampled_weights(model, keras_swa.SWAG()):
            pass
    with pytest.raises(TypeError, match="`model` must be a `keras.Model`"):
        keras_swa.predict_bma(x, x, source=swag)


def test_a_generator_as_x_is_read_once_for_every_sample():
    # `model.predict` reads a generator of `(x,)` tuples; `predict_bma` reads
    # `x` once per sample, so it keeps the batches of a generator or
    # iterator (bare arrays, `(x,)` or `(x, y)`) from its one pass. On the
    # code before, the second sample met an exhausted generator.
    model, swag, x = trained()
    before = state(model)
    arguments = dict(source=swag, scale=0.5, seed=2, bn_data=x, bn_steps=2,
                     from_logits=True)
    batches = [x[i : i + 16] for i in range(0, len(x), 16)]
    expected = keras_swa.predict_bma(
        model, x, num_samples=3, batch_size=16, **arguments
    )
    forms = {
        "tuples": lambda: ((batch,) for batch in batches),
        "arrays": lambda: (batch for batch in batches),
        "pairs": lambda: ((batch, batch[:, 0]) for batch in batches),
        "iterator": lambda: iter(batches),
    }
    for form, data in forms.items():
        probabilities = keras_swa.predict_bma(
            model, data(), num_samples=3, **arguments
        )
        np.testing.assert_allclose(
            probabilities, expected, rtol=1e-6, atol=1e-7, err_msg=form
        )
    # One sample (`scale=0`, the SWA mean) reads it once too.
    np.testing.assert_allclose(
        keras_swa.predict_bma(model, forms["arrays"](), **{**arguments,
                                                           "scale": 0.0}),
        keras_swa.predict_bma(model, x, batch_size=16, **{**arguments,
                                                          "scale": 0.0}),
        rtol=1e-6, atol=1e-7,
    )
    # `batch_size` applies to arrays only.
    with pytest.raises(ValueError, match="`batch_size` applies to arrays"):
        keras_swa.predict_bma(model, forms["arrays"](), batch_size=16,
                              **arguments)
    # A generator without a batch: refused before any sample.
    with pytest.raises(ValueError, match="`x`.*no batch"):
        keras_swa.predict_bma(model, iter([]), num_samples=3, **arguments)
    assert_same_state(model, before)
