"""Tests of `keras_swa.update_bn` against statistics computed in NumPy."""

import gc
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_swa

EPSILON = 1e-3  # BatchNormalization's default.
SIZES = (32, 32, 6)  # 70 samples in batches of 32, as `predict` splits them.


def _garble(layers, seed=0):
    """Gives BatchNormalization layers stale statistics far from any answer."""
    rng = np.random.default_rng(seed)
    for layer in layers:
        shape = layer.moving_mean.shape
        layer.moving_mean.assign(rng.normal(0.0, 30.0, shape))
        layer.moving_variance.assign(rng.uniform(50.0, 100.0, shape))


def _randomize(layer, rng):
    """Gives a layer random weights, so that every weight matters."""
    layer.set_weights(
        [
            rng.normal(0.0, 1.0, w.shape).astype("float32")
            for w in layer.get_weights()
        ]
    )


def _expected(batch_statistics, sizes):
    """Sample-weighted means of per-batch `(mean, variance)` pairs."""
    sizes = np.asarray(sizes, dtype="float64")
    means = np.stack([m for m, _ in batch_statistics])
    variances = np.stack([v for _, v in batch_statistics])
    total = sizes.sum()
    return sizes @ means / total, sizes @ variances / total


def _moments(a, axes=0):
    return a.mean(axis=axes), a.var(axis=axes)  # NumPy's var is biased.


def _normalize(a, mean, variance, gamma, beta):
    return (a - mean) / np.sqrt(variance + EPSILON) * gamma + beta


class _Block(keras.layers.Layer):
    """A subclassed layer holding BatchNormalization, found only by walking."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.BatchNormalization(name="block_bn")
        self.dense = keras.layers.Dense(3, name="block_dense")

    def build(self, input_shape):
        self.norm.build(input_shape)
        self.dense.build(input_shape)

    def call(self, x, training=None):
        return self.dense(self.norm(x, training=training))


class _InferenceBlock(keras.layers.Layer):
    """Always runs its (trainable) BN in inference mode, as fine-tuning does.

    (In a functional model, Keras 3 lets the outer `training` override a
    `training=False` given when the graph was built, hence a layer.)
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.BatchNormalization(name="inference_bn")

    def build(self, input_shape):
        self.norm.build(input_shape)

    def call(self, x):
        return self.norm(x, training=False)


def _nested_model(rng):
    """Sequential and a subclassed layer inside a functional model.

    Dense -> BN (Sequential) -> ReLU -> Dense -> BN (subclassed) -> ...: the
    input of the second BN depends on the first BN's training-mode output.
    Besides: a frozen BN, a trainable BN that the model calls with
    `training=False` (fine-tuning style), and Dropout after all BN layers.
    """
    inputs = keras.Input((6,))
    inner = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5),
            keras.layers.BatchNormalization(),
        ],
        name="inner",
    )
    block = _Block(name="block")
    frozen = keras.layers.BatchNormalization(name="frozen_bn")
    inference = _InferenceBlock(name="inference")
    hidden = keras.layers.ReLU()(inner(inputs))
    hidden = keras.layers.Dense(4, name="middle")(hidden)
    outputs = keras.layers.Concatenate()(
        [block(hidden), frozen(inputs), inference(inputs)]
    )
    outputs = keras.layers.Dropout(0.5)(outputs)
    outputs = keras.layers.Dense(1)(outputs)
    model = keras.Model(inputs, outputs)
    frozen.trainable = False
    for layer in [
        inner.layers[0],
        inner.layers[1],
        model.get_layer("middle"),
        block.norm,
        block.dense,
    ]:
        _randomize(layer, rng)
    return model


def _nested_reference(model, x, sizes):
    """The expected statistics of the two updated BN layers, in float64."""
    dense, norm = model.get_layer("inner").layers
    kernel, bias = (w.astype("float64") for w in dense.get_weights())
    gamma, beta = (w.astype("float64") for w in norm.get_weights()[:2])
    middle_kernel, middle_bias = (
        w.astype("float64") for w in model.get_layer("middle").get_weights()
    )
    first, second = [], []
    start = 0
    for size in sizes:
        batch = x[start : start + size].astype("float64")
        start += size
        a = batch @ kernel + bias
        first.append(_moments(a))
        h = np.maximum(_normalize(a, *first[-1], gamma, beta), 0.0)
        second.append(_moments(h @ middle_kernel + middle_bias))
    return _expected(first, sizes), _expected(second, sizes)


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


def _assert_same(before, after):
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("steps", [None, 2, 100])
def test_nested_model_matches_numpy(steps):
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    model = _nested_model(rng)
    x = rng.normal(2.0, 3.0, (70, 6)).astype("float32")
    inner_bn = model.get_layer("inner").layers[1]
    block_bn = model.get_layer("block").norm
    frozen_bn = model.get_layer("frozen_bn")
    inference_bn = model.get_layer("inference").norm
    _garble([inner_bn, block_bn, frozen_bn, inference_bn])
    untouched = _values(
        frozen_bn.weights + inference_bn.weights + model.trainable_weights
    )

    keras_swa.update_bn(model, x, steps=steps, verbose=0)

    sizes = SIZES[:steps]
    (mean1, var1), (mean2, var2) = _nested_reference(model, x, sizes)
    np.testing.assert_allclose(
        inner_bn.moving_mean.numpy(), mean1, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        inner_bn.moving_variance.numpy(), var1, rtol=1e-5
    )
    np.testing.assert_allclose(
        block_bn.moving_mean.numpy(), mean2, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        block_bn.moving_variance.numpy(), var2, rtol=1e-5
    )
    _assert_same(
        untouched,
        _values(
            frozen_bn.weights + inference_bn.weights + model.trainable_weights
        ),
    )


def test_layer_called_in_inference_mode_is_bitwise_unchanged():
    # Averaging its unchanged statistics over 7 batches would be off by an
    # ulp here and there: the layer must be recognized as not updated.
    keras.utils.set_random_seed(11)
    inputs = keras.Input((8,))
    block = _InferenceBlock()
    model = keras.Model(inputs, block(inputs))
    _garble([block.norm])
    before = _values(block.norm.weights)
    x = np.random.default_rng(11).normal(size=(197, 8)).astype("float32")

    keras_swa.update_bn(model, x, verbose=0)

    _assert_same(before, _values(block.norm.weights))


class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.BatchNormalization()

    def call(self, x):
        return self.norm(x)


def test_short_last_batch_counts_by_its_size():
    # Unweighted means of the batch statistics would differ by far more.
    keras.utils.set_random_seed(2)
    x = np.concatenate([np.zeros((64, 1)), np.full((6, 1), 10.0)]).astype(
        "float32"
    )
    model = _Subclassed(name="subclassed")
    model(x[:1])
    norm = model.norm

    keras_swa.update_bn(model, x, verbose=0)

    # Batches: 32 zeros, 32 zeros, 6 tens (variance 0 in each batch).
    np.testing.assert_allclose(
        norm.moving_mean.numpy(), [60.0 / 70.0], rtol=1e-6
    )
    np.testing.assert_allclose(norm.moving_variance.numpy(), [0.0], atol=1e-6)


def test_conv_batch_norm_channels_last():
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    inputs = keras.Input((5, 5, 2))
    conv = keras.layers.Conv2D(3, 3, padding="same")
    norm = keras.layers.BatchNormalization(axis=-1)
    model = keras.Model(inputs, keras.layers.ReLU()(norm(conv(inputs))))
    _randomize(conv, rng)
    _garble([norm])
    x = rng.normal(1.0, 2.0, (70, 5, 5, 2)).astype("float32")
    # The convolution does not depend on the training mode.
    features = (
        keras.Model(inputs, conv.output).predict(x, verbose=0).astype("float64")
    )
    statistics = []
    start = 0
    for size in SIZES:
        statistics.append(
            _moments(features[start : start + size], axes=(0, 1, 2))
        )
        start += size
    mean, variance = _expected(statistics, SIZES)

    keras_swa.update_bn(model, x, verbose=0)

    np.testing.assert_allclose(
        norm.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        norm.moving_variance.numpy(), variance, rtol=1e-5
    )


def test_synchronized_and_renorm_layers():
    keras.utils.set_random_seed(4)
    rng = np.random.default_rng(4)
    inputs = keras.Input((3,))
    # Keras synchronizes the statistics across replicas on TensorFlow only;
    # elsewhere the layer refuses the argument.
    synchronized = keras.layers.BatchNormalization(
        synchronized=keras.backend.backend() == "tensorflow"
    )
    renorm = keras.layers.BatchNormalization(
        renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0}
    )
    model = keras.Model(
        inputs,
        keras.layers.Concatenate()([synchronized(inputs), renorm(inputs)]),
    )
    _garble([synchronized, renorm])
    renorm.renorm_mean.assign([5.0, -5.0, 1.0])
    renorm.renorm_stddev.assign([3.0, 0.5, 1.0])
    renorm_state = _values([renorm.renorm_mean, renorm.renorm_stddev])
    x = rng.normal(-1.0, 2.0, (70, 3)).astype("float32")
    statistics = []
    start = 0
    for size in SIZES:
        statistics.append(_moments(x[start : start + size].astype("float64")))
        start += size
    mean, variance = _expected(statistics, SIZES)

    keras_swa.update_bn(model, x, verbose=0)

    for layer in (synchronized, renorm):
        np.testing.assert_allclose(
            layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6
        )
        # Renorm derives its variance from a standard deviation: less exact.
        np.testing.assert_allclose(
            layer.moving_variance.numpy(), variance, rtol=1e-4
        )
    np.testing.assert_allclose(
        renorm.moving_stddev.numpy(), np.sqrt(variance + EPSILON), rtol=1e-5
    )
    assert renorm.renorm_momentum == 0.99
    _assert_same(
        renorm_state, _values([renorm.renorm_mean, renorm.renorm_stddev])
    )


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size=32, fail_at=None):
        super().__init__()
        self.x, self.y, self.batch_size, self.fail_at = (
            x,
            y,
            batch_size,
            fail_at,
        )

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index):
        if index == self.fail_at:
            raise RuntimeError("broken batch")
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[part], self.y[part]


def _dense_model():
    inputs = keras.Input((4,))
    hidden = keras.layers.BatchNormalization()(keras.layers.Dense(6)(inputs))
    hidden = keras.layers.BatchNormalization()(keras.layers.Dense(5)(hidden))
    return keras.Model(inputs, keras.layers.Dense(1)(hidden))


def _statistics(model):
    return _values(
        [
            v
            for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)
            for v in (layer.moving_mean, layer.moving_variance)
        ]
    )


def test_all_input_types_give_the_same_statistics():
    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(5)
    model = _dense_model()
    x = rng.normal(size=(70, 4)).astype("float32")
    y = rng.normal(size=(70, 1)).astype("float32")
    w = rng.uniform(size=(70,)).astype("float32")
    inputs = {
        "array": x,
        "x tuple": (x,),
        "x, y tuple": (x, y),
        "x, y, w tuple": (x, y, w),
        "dataset": tf.data.Dataset.from_tensor_slices((x, y)).batch(32),
        "dataset of x": tf.data.Dataset.from_tensor_slices(x).batch(32),
        "PyDataset": _Batches(x, y),
    }
    results = {}
    for name, data in inputs.items():
        _garble(
            [l for l in model.layers if "batch_norm" in l.name], seed=len(name)
        )
        keras_swa.update_bn(model, data, verbose=0)
        results[name] = _statistics(model)
    for name, result in results.items():
        for got, want in zip(result, results["array"], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
    assert not np.allclose(results["array"][1], 1.0)


def test_several_inputs():
    keras.utils.set_random_seed(12)
    rng = np.random.default_rng(12)
    first, second = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    norm = keras.layers.BatchNormalization()
    model = keras.Model(
        {"a": first, "b": second},
        norm(keras.layers.Concatenate()([first, second])),
    )
    x = {
        "a": rng.normal(size=(70, 2)).astype("float32"),
        "b": rng.normal(3.0, 2.0, size=(70, 3)).astype("float32"),
    }
    joined = np.concatenate([x["a"], x["b"]], axis=1).astype("float64")
    mean, variance = _expected(
        [_moments(joined[:32]), _moments(joined[32:64]), _moments(joined[64:])],
        SIZES,
    )
    for data in [(x,), tf.data.Dataset.from_tensor_slices(x).batch(32)]:
        _garble([norm])
        keras_swa.update_bn(model, data, verbose=0)
        np.testing.assert_allclose(
            norm.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            norm.moving_variance.numpy(), variance, rtol=1e-5
        )


def test_empty_data_raises_and_leaves_statistics():
    keras.utils.set_random_seed(6)
    model = _dense_model()
    _garble([l for l in model.layers if "batch_norm" in l.name])
    before = _statistics(model)
    empty = np.zeros((0, 4), dtype="float32")
    for data in [
        empty,
        (empty, empty),
        tf.data.Dataset.from_tensor_slices(empty).batch(8),
    ]:
        with pytest.raises(ValueError, match="no batch"):
            keras_swa.update_bn(model, data, verbose=0)
        _assert_same(before, _statistics(model))


@pytest.mark.parametrize(
    "data",
    [
        "abc",
        3,
        {"x": np.zeros((4, 4))},
        [np.zeros((4, 4))],
        (),
        (np.zeros((4, 4)),) * 4,
        ("abc",),
        (np.float32(1.0),),
    ],
    ids=[
        "str",
        "int",
        "dict",
        "list",
        "empty tuple",
        "4-tuple",
        "str x",
        "scalar x",
    ],
)
def test_unsupported_data_raises_type_error(data):
    model = _dense_model()
    with pytest.raises(TypeError, match="`data`"):
        keras_swa.update_bn(model, data, verbose=0)


def test_bad_steps_and_verbose():
    model = _dense_model()
    x = np.zeros((8, 4), dtype="float32")
    with pytest.raises(ValueError, match="steps"):
        keras_swa.update_bn(model, x, steps=0)
    with pytest.raises(TypeError, match="steps"):
        keras_swa.update_bn(model, x, steps=1.5)
    with pytest.raises(ValueError, match="verbose"):
        keras_swa.update_bn(model, x, verbose=3)


def test_failure_midway_restores_everything():
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(7)
    model = _dense_model()
    norms = [l for l in model.layers if "batch_norm" in l.name]
    _garble(norms)
    before = _values(model.weights)
    x = rng.normal(size=(70, 4)).astype("float32")

    with pytest.raises(RuntimeError, match="broken batch"):
        keras_swa.update_bn(model, _Batches(x, x, fail_at=1), verbose=0)

    _assert_same(before, _values(model.weights))
    assert [layer.momentum for layer in norms] == [0.99, 0.99]


def test_leaves_momentum_config_and_trainable_weights():
    keras.utils.set_random_seed(8)
    rng = np.random.default_rng(8)
    inputs = keras.Input((4,))
    norm = keras.layers.BatchNormalization(momentum=0.7, epsilon=0.01)
    model = keras.Model(inputs, keras.layers.Dense(2)(norm(inputs)))
    config = norm.get_config()
    trainable = _values(model.trainable_weights)

    keras_swa.update_bn(
        model, rng.normal(size=(40, 4)).astype("float32"), verbose=0
    )

    assert norm.momentum == 0.7
    assert norm.get_config() == config
    _assert_same(trainable, _values(model.trainable_weights))
    assert not np.allclose(norm.moving_mean.numpy(), 0.0)


def test_model_without_batch_norm_is_unchanged():
    keras.utils.set_random_seed(9)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dropout(0.5)]
    )
    before = _values(model.variables)
    keras_swa.update_bn(model, np.ones((10, 4), dtype="float32"), verbose=0)
    _assert_same(before, _values(model.variables))


class _TraceCounter(keras.layers.Layer):
    """Counts the Python executions of `call`: one per trace when compiled."""

    calls = 0

    def call(self, x):
        type(self).calls += 1
        return x


@pytest.mark.skipif(
    keras.backend.backend() == "torch", reason="PyTorch runs eagerly: no trace."
)
def test_one_trace_for_a_ragged_last_batch():
    keras.utils.set_random_seed(10)
    inputs = keras.Input((4,))
    first = keras.layers.BatchNormalization()
    second = keras.layers.BatchNormalization()
    model = keras.Model(inputs, second(first(_TraceCounter()(inputs))))
    x = np.random.default_rng(10).normal(size=(70, 4)).astype("float32")
    _TraceCounter.calls = 0

    # TensorFlow traces once for any batch size; `jax.jit` needs static
    # shapes, so there a short batch of a new size traces once more.
    jax = keras.backend.backend() == "jax"

    keras_swa.update_bn(model, x, verbose=0)  # batches of 32, 32, 6

    assert _TraceCounter.calls == (2 if jax else 1)
    # The compiled pass is kept for the next call on the same model...
    keras_swa.update_bn(model, x[:50], verbose=0)  # 32, 18: 18 is new
    assert _TraceCounter.calls == (3 if jax else 1)
    # ...unless a layer changed from trainable to frozen or back.
    second.trainable = False
    _garble([first, second])
    before = _values(second.weights)
    keras_swa.update_bn(model, x, verbose=0)
    assert _TraceCounter.calls == (5 if jax else 2)
    _assert_same(before, _values(second.weights))
    mean, _ = _expected(
        [_moments(x[:32]), _moments(x[32:64]), _moments(x[64:])], SIZES
    )
    np.testing.assert_allclose(
        first.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6
    )


def test_compiled_pass_does_not_keep_the_model_alive():
    model = _dense_model()
    keras_swa.update_bn(model, np.ones((8, 4), dtype="float32"), verbose=0)
    reference = weakref.ref(model)
    del model
    gc.collect()
    assert reference() is None


def test_progress_bar(capsys):
    model = _dense_model()
    x = np.ones((70, 4), dtype="float32")
    keras_swa.update_bn(model, x, verbose=0)
    assert capsys.readouterr().out == ""
    keras_swa.update_bn(model, x)
    assert "3/3" in capsys.readouterr().out
