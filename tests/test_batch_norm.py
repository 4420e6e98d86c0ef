"""Tests of `keras_swa.update_bn` against statistics computed in NumPy."""

import gc
import types
import weakref

import keras
import numpy as np
import pytest

import keras_swa

# TensorFlow is an extra: its forms (tf tensors, tf.data) are tested where it
# is installed, on every backend; elsewhere the tests run without them.
try:
    import tensorflow as tf
except ImportError:
    tf = None
needs_tf = pytest.mark.skipif(tf is None, reason="needs TensorFlow (tf.data)")
# JAX and PyTorch come with the `backends` extra (`make test` installs it);
# their tensors and DataLoader are tested where installed, on every backend.
try:
    import jax.numpy as jnp
except ImportError:
    jnp = None
try:
    import torch
except ImportError:
    torch = None

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
        **(
            {
                "dataset": tf.data.Dataset.from_tensor_slices(
                    (x, y)
                ).batch(32),
                "dataset of x": tf.data.Dataset.from_tensor_slices(
                    x
                ).batch(32),
            }
            if tf is not None
            else {}
        ),
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
    datasets = [tf.data.Dataset.from_tensor_slices(x).batch(32)] if tf else []
    for data in [(x,)] + datasets:
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
    ] + ([tf.data.Dataset.from_tensor_slices(empty).batch(8)] if tf else []):
        with pytest.raises(ValueError, match="no batch"):
            keras_swa.update_bn(model, data, verbose=0)
        _assert_same(before, _statistics(model))


@pytest.mark.parametrize(
    "data",
    [
        "abc",
        3,
        (),
        (np.zeros((4, 4)),) * 4,
        ("abc",),
        (np.float32(1.0),),
    ],
    ids=[
        "str",
        "int",
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


# Every form of `data` that `model.fit` accepts as `x`, against NumPy.


def _input_bn_model(features=4):
    """Input -> BatchNormalization: the statistics are the data's moments."""
    inputs = keras.Input((features,))
    norm = keras.layers.BatchNormalization()
    return keras.Model(inputs, norm(inputs)), norm


def _reference(x, sizes):
    """Sample-weighted mean of the batch moments of `x` split by `sizes`."""
    assert sum(sizes) <= len(x)
    statistics, start = [], 0
    for size in sizes:
        statistics.append(_moments(x[start : start + size].astype("float64")))
        start += size
    return _expected(statistics, sizes)


def _split(total, batch_size):
    return [min(batch_size, total - s) for s in range(0, total, batch_size)]


def _assert_statistics(norm, x, sizes, name=""):
    mean, variance = _reference(x, sizes)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(norm.moving_mean),
        mean,
        rtol=1e-5,
        atol=1e-6,
        err_msg=name,
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(norm.moving_variance),
        variance,
        rtol=1e-5,
        err_msg=name,
    )


def _generator(x, y, batch_size):
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def _foreign_tensors(x):
    """`x` as a tensor of each installed framework, whatever the backend."""
    tensors = {}
    if tf is not None:
        tensors["tf tensor"] = tf.constant(x)
    if jnp is not None:
        tensors["jax array"] = jnp.asarray(x)
    if torch is not None:
        tensors["torch tensor"] = torch.from_numpy(x.copy())
    return tensors


def _tf_data_forms(x, y):
    if tf is None:
        return {}
    n = len(x)
    return {
        "tf.data": (
            tf.data.Dataset.from_tensor_slices((x, y)).batch(20),
            None,
            None,
            _split(n, 20),
        ),
        "tf.data of x": (
            tf.data.Dataset.from_tensor_slices(x).batch(20),
            None,
            None,
            _split(n, 20),
        ),
        "infinite tf.data with steps": (
            tf.data.Dataset.from_tensor_slices(x).batch(20).repeat(),
            None,
            np.int64(3),
            [20, 20, 20],
        ),
    }


def _loader_forms(x, y):
    if torch is None:
        return {}
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        batch_size=25,
    )
    return {
        "DataLoader": (loader, None, None, _split(len(x), 25)),
        "DataLoader, steps 2": (loader, None, 2, [25, 25]),
    }


def _accepted_forms(x, y, w):
    """`(data, batch_size, steps, batch sizes expected)` for every form."""
    n = len(x)
    return {
        "array": (x, None, None, _split(n, 32)),
        "array, batch_size 7": (x, 7, None, _split(n, 7)),
        "array, batch_size np.int64(7)": (x, np.int64(7), None, _split(n, 7)),
        "array, batch_size 7, steps 3": (x, 7, 3, [7, 7, 7]),
        "backend tensor": (keras.ops.convert_to_tensor(x), 20, None, _split(n, 20)),
        **{
            name: (value, 16, None, _split(n, 16))
            for name, value in _foreign_tensors(x).items()
        },
        "float64 array": (x.astype("float64"), 32, None, _split(n, 32)),
        "(x,)": ((x,), None, None, _split(n, 32)),
        "(x, y)": ((x, y), 10, None, _split(n, 10)),
        "(x, y, sample_weight)": ((x, y, w), 10, None, _split(n, 10)),
        "(x, None, sample_weight)": ((x, None, w), 10, None, _split(n, 10)),
        **_tf_data_forms(x, y),
        "PyDataset": (_Batches(x, y, batch_size=16), None, None, _split(n, 16)),
        "generator": (_generator(x, y, 30), None, None, _split(n, 30)),
        "generator of x": (
            (x[s : s + 30] for s in range(0, n, 30)),
            None,
            None,
            _split(n, 30),
        ),
        "iterator": (
            iter([(x[:40],), (x[40:],)]),
            None,
            None,
            [40, n - 40],
        ),
        **_loader_forms(x, y),
    }


def test_every_accepted_form_matches_numpy():
    keras.utils.set_random_seed(20)
    rng = np.random.default_rng(20)
    x = rng.normal(2.0, 3.0, (70, 4)).astype("float32")
    y = rng.normal(size=(70, 1)).astype("float32")
    w = rng.uniform(size=(70,)).astype("float32")
    model, norm = _input_bn_model()
    for name, (data, batch_size, steps, sizes) in _accepted_forms(
        x, y, w
    ).items():
        _garble([norm], seed=len(name))
        keras_swa.update_bn(
            model, data, steps=steps, batch_size=batch_size, verbose=0
        )
        _assert_statistics(norm, x, sizes, name)
    # The batch size matters: batches of 7 and of 32 differ.
    assert not np.allclose(
        _reference(x, _split(70, 7))[1], _reference(x, _split(70, 32))[1]
    )


def _two_input_model():
    first, second = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    norm = keras.layers.BatchNormalization()
    return (
        keras.Model(
            {"a": first, "b": second},
            norm(keras.layers.Concatenate()([first, second])),
        ),
        keras.Model(
            [first, second], norm(keras.layers.Concatenate()([first, second]))
        ),
        norm,
    )


def test_dict_and_list_inputs_match_numpy():
    keras.utils.set_random_seed(21)
    rng = np.random.default_rng(21)
    a = rng.normal(size=(70, 2)).astype("float32")
    b = rng.normal(3.0, 2.0, size=(70, 3)).astype("float32")
    joined = np.concatenate([a, b], axis=1)
    dict_model, list_model, norm = _two_input_model()
    y = np.zeros((70, 1), "float32")
    forms = {
        "dict": (dict_model, {"a": a, "b": b}, 7),
        "(dict, y)": (dict_model, ({"a": a, "b": b}, y), 7),
        "list": (list_model, [a, b], 7),
        "(list,)": (list_model, ([a, b],), 7),
        **(
            {
                "list of tf tensors": (
                    list_model, [tf.constant(a), tf.constant(b)], 7
                ),
                "tf.data of dicts": (
                    dict_model,
                    tf.data.Dataset.from_tensor_slices(
                        ({"a": a, "b": b}, y)
                    ).batch(7),
                    None,
                ),
            }
            if tf is not None
            else {}
        ),
        "generator of (list, y)": (
            list_model,
            (([a[s : s + 7], b[s : s + 7]], y[s : s + 7]) for s in range(0, 70, 7)),
            None,
        ),
    }
    for name, (model, data, batch_size) in forms.items():
        _garble([norm], seed=len(name))
        keras_swa.update_bn(model, data, batch_size=batch_size, verbose=0)
        _assert_statistics(norm, joined, _split(70, 7), name)


@needs_tf
def test_infinite_dataset_without_steps_is_a_value_error():
    model, norm = _input_bn_model()
    _garble([norm])
    before = _values(norm.weights)
    x = np.ones((8, 4), "float32")
    # Reports an infinite cardinality, but fails after 5 batches rather
    # than looping forever where the cardinality is not checked.
    infinite = (
        tf.data.Dataset.from_tensors(x)
        .repeat(5)
        .apply(
            tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY)
        )
    )
    with pytest.raises(ValueError, match=r"infinite[\s\S]*`steps`"):
        keras_swa.update_bn(model, infinite, verbose=0)
    _assert_same(before, _values(norm.weights))


class _InfiniteBatches(keras.utils.PyDataset):
    def __init__(self, x):
        super().__init__()
        self.x = x

    @property
    def num_batches(self):
        return None  # infinite

    def __getitem__(self, index):
        # Fails rather than looping forever where infinity is not checked.
        if index >= 10:
            raise RuntimeError("read 10 batches of an infinite PyDataset")
        return self.x


def test_infinite_py_dataset_needs_steps():
    model, norm = _input_bn_model()
    x = np.random.default_rng(22).normal(size=(9, 4)).astype("float32")
    with pytest.raises(ValueError, match=r"infinite[\s\S]*`steps`"):
        keras_swa.update_bn(model, _InfiniteBatches(x), verbose=0)
    keras_swa.update_bn(model, _InfiniteBatches(x), steps=3, verbose=0)
    _assert_statistics(norm, np.concatenate([x] * 3), [9, 9, 9])


def test_batch_size_only_with_arrays():
    model, _ = _input_bn_model()
    x = np.ones((8, 4), "float32")
    datasets = [tf.data.Dataset.from_tensor_slices(x).batch(4)] if tf else []
    for data in datasets + [_Batches(x, x), (b for b in [x])]:
        with pytest.raises(ValueError, match="`batch_size`"):
            keras_swa.update_bn(model, data, batch_size=4, verbose=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"steps": True}, TypeError, "`steps`"),
        ({"steps": 2.0}, TypeError, "`steps`"),
        ({"steps": 0}, ValueError, "`steps`"),
        ({"steps": np.int64(0)}, ValueError, "`steps`"),
        ({"batch_size": True}, TypeError, "`batch_size`"),
        ({"batch_size": "32"}, TypeError, "`batch_size`"),
        ({"batch_size": 0}, ValueError, "`batch_size`"),
        ({"verbose": "yes"}, ValueError, "`verbose`"),
        ({"verbose": True}, ValueError, "`verbose`"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    model, norm = _input_bn_model()
    before = _values(norm.weights)
    with pytest.raises(error, match=match):
        keras_swa.update_bn(model, np.ones((8, 4), "float32"), **kwargs)
    _assert_same(before, _values(norm.weights))


def test_numpy_integer_steps_and_batch_size():
    model, norm = _input_bn_model()
    x = np.random.default_rng(23).normal(size=(40, 4)).astype("float32")
    keras_swa.update_bn(
        model, x, steps=np.int32(2), batch_size=np.int64(15), verbose=0
    )
    _assert_statistics(norm, x, [15, 15])


def test_arrays_of_different_lengths():
    model, norm = _input_bn_model()
    x = np.ones((8, 4), "float32")
    with pytest.raises(ValueError, match="`data`.*same number of samples"):
        keras_swa.update_bn(model, (x, np.ones((7, 1))), verbose=0)
    _dict_model, list_model, _ = _two_input_model()
    with pytest.raises(ValueError, match="same number of samples"):
        keras_swa.update_bn(
            list_model, [np.ones((8, 2)), np.ones((9, 3))], verbose=0
        )


@pytest.mark.parametrize("model", [None, "model", np.ones((3, 3))])
def test_model_that_is_not_a_layer(model):
    with pytest.raises(TypeError, match="`model`"):
        keras_swa.update_bn(model, np.ones((8, 4), "float32"), verbose=0)


# `update_bn` writes the BatchNormalization statistics and nothing else.


def _non_statistics(model):
    statistics = {
        id(v) for v in keras_swa.batch_norm.statistics_variables(model)
    }
    return [v for v in model.variables if id(v) not in statistics]


def test_spectral_normalization_is_bitwise_unchanged():
    # In training mode SpectralNormalization writes its kernel (normalized)
    # and `vector_u` (one power iteration).
    keras.utils.set_random_seed(24)
    rng = np.random.default_rng(24)
    inputs = keras.Input((5,))
    spectral = keras.layers.SpectralNormalization(keras.layers.Dense(6))
    norm = keras.layers.BatchNormalization()
    model = keras.Model(inputs, norm(spectral(inputs)))
    _randomize(spectral.layer, rng)
    others = _non_statistics(model)
    assert any("vector_u" in v.path for v in others)
    before = _values(others)
    x = rng.normal(size=(70, 5)).astype("float32")

    keras_swa.update_bn(model, x, verbose=0)

    _assert_same(before, _values(others))
    # The statistics are those of the training-mode output: the kernel
    # normalized by one power iteration from the current `vector_u`.
    kernel, bias = (w.astype("float64") for w in spectral.layer.get_weights())
    u = before[[i for i, v in enumerate(others) if "vector_u" in v.path][0]]
    u = u.astype("float64")
    v = u @ kernel.T
    v /= np.linalg.norm(v)
    u = v @ kernel
    u /= np.linalg.norm(u)
    sigma = (v @ kernel @ u.T).item()
    features = x.astype("float64") @ (kernel / sigma) + bias
    _assert_statistics(norm, features, SIZES)


class _Counter(keras.layers.Layer):
    """Counts its training-mode calls in a variable, as some layers do."""

    def build(self, input_shape):
        self.count = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="count"
        )

    def call(self, x, training=None):
        if training:
            self.count.assign_add(1.0)
        return x


def test_layer_state_written_in_training_mode_is_kept():
    inputs = keras.Input((4,))
    counter = _Counter()
    norm = keras.layers.BatchNormalization()
    model = keras.Model(inputs, norm(counter(inputs)))
    counter.count.assign(5.0)
    x = np.random.default_rng(25).normal(size=(70, 4)).astype("float32")

    keras_swa.update_bn(model, x, verbose=0)

    assert float(keras.ops.convert_to_numpy(counter.count)) == 5.0
    _assert_statistics(norm, x, SIZES)


def test_failure_midway_writes_nothing():
    inputs = keras.Input((5,))
    spectral = keras.layers.SpectralNormalization(keras.layers.Dense(4))
    counter = _Counter()
    model = keras.Model(
        inputs, keras.layers.BatchNormalization()(counter(spectral(inputs)))
    )
    before = _values(model.variables)
    x = np.random.default_rng(26).normal(size=(70, 5)).astype("float32")
    with pytest.raises(RuntimeError, match="broken batch"):
        keras_swa.update_bn(model, _Batches(x, x, fail_at=2), verbose=0)
    _assert_same(before, _values(model.variables))


def test_dropout_draws_new_masks_per_batch_and_keeps_its_seed():
    # Two identical batches: with the same Dropout mask for both, the
    # statistics of one batch and of two would be equal.
    keras.utils.set_random_seed(27)
    inputs = keras.Input((200,))
    # Seeded: unseeded, PyTorch's Dropout draws from torch's global
    # generator, not from its seed state.
    dropout = keras.layers.Dropout(0.5, seed=3)
    norm = keras.layers.BatchNormalization()
    model = keras.Model(inputs, norm(dropout(inputs)))
    x = np.ones((64, 200), "float32")
    seeds = _values(dropout.variables)
    assert seeds

    keras_swa.update_bn(model, x, steps=1, verbose=0)
    one = _values([norm.moving_mean])
    _assert_same(seeds, _values(dropout.variables))
    keras_swa.update_bn(model, x, steps=2, verbose=0)
    two = _values([norm.moving_mean])
    _assert_same(seeds, _values(dropout.variables))
    keras_swa.update_bn(model, x, steps=2, verbose=0)

    assert not np.array_equal(one[0], two[0])
    # The seed is kept, so the same call gives the same statistics.
    _assert_same(two, _values([norm.moving_mean]))


def test_bfloat16_policy_keeps_float32_sums():
    keras.config.set_dtype_policy("bfloat16")
    model, norm = _input_bn_model(3)
    assert norm.moving_mean.dtype == "bfloat16"
    rng = np.random.default_rng(28)
    # Bfloat16 data: the reference then sees the same inputs.
    x = keras.ops.convert_to_numpy(
        keras.ops.cast(
            keras.ops.cast(rng.normal(5.0, 2.0, (640, 3)), "bfloat16"),
            "float32",
        )
    )

    keras_swa.update_bn(model, x, batch_size=8, verbose=0)

    mean, variance = _reference(x, _split(640, 8))
    got_mean = keras.ops.convert_to_numpy(
        keras.ops.cast(norm.moving_mean, "float32")
    )
    # Within the rounding of one bfloat16 value (8 bits of mantissa), not
    # the drift of 80 bfloat16 additions.
    np.testing.assert_allclose(got_mean, mean, rtol=2**-8)


def test_non_finite_statistics_do_not_leak():
    # With momentum 0, `0 * old + batch` is NaN where `old` is NaN or
    # infinite: the old statistics must not enter the computation at all.
    model, norm = _input_bn_model()
    norm.moving_mean.assign([np.nan, np.inf, -np.inf, 1.0])
    norm.moving_variance.assign([np.inf, np.nan, 1.0, np.nan])
    x = np.random.default_rng(29).normal(size=(70, 4)).astype("float32")

    keras_swa.update_bn(model, x, verbose=0)

    _assert_statistics(norm, x, SIZES)


def test_recompute_names_the_callers_arguments():
    # What `bn_data` of the other functions and callbacks goes through.
    model, norm = _input_bn_model()
    x = np.ones((8, 4), "float32")
    names = {"data_name": "bn_data", "steps_name": "bn_steps"}
    generator = (b for b in [x])
    keras_swa.batch_norm.recompute(model, generator, verbose=0, **names)
    with pytest.raises(ValueError, match="`bn_data` yielded no batch"):
        keras_swa.batch_norm.recompute(model, generator, verbose=0, **names)
    # An infinite tf.data.Dataset (test_data checks these names with an
    # infinite PyDataset, without TensorFlow too).
    if tf is not None:
        infinite = tf.data.Dataset.from_tensors(x).repeat()
        with pytest.raises(
            ValueError, match="`bn_data` is an infinite.*`bn_steps`"
        ):
            keras_swa.batch_norm.recompute(model, infinite, **names)
    with pytest.raises(TypeError, match="`bn_steps`.*Received: bn_steps=1.5"):
        keras_swa.batch_norm.recompute(model, x, steps=1.5, **names)
    with pytest.raises(ValueError, match="Each batch of `bn_data`"):
        keras_swa.batch_norm.recompute(
            model, iter([(x, x, x, x)]), verbose=0, **names
        )


def test_bn_recompute_checks_by_the_public_names_and_runs_update_bn():
    # `batch_norm.BNRecompute` carries `bn_data`, `bn_steps`, `bn_batch_size`
    # and `verbose` from every public function and callback down. Its
    # checks are those the functions made before it (the same messages).
    recompute = keras_swa.batch_norm.BNRecompute
    model, norm = _input_bn_model()
    x = np.random.default_rng(31).normal(size=(70, 4)).astype("float32")
    for arguments, reused, error, message in [
        ((None, 2, None), False, ValueError,
         "`bn_steps` is given but `bn_data` is None"),
        ((None, None, 4), False, ValueError,
         "`bn_batch_size` is given but `bn_data` is None"),
        ((x, 0, None), False, ValueError, "`bn_steps` must be"),
        ((x, None, 1.5), False, TypeError, "`bn_batch_size` must be"),
        ((iter([x]), None, None), True, ValueError,
         "`bn_data` is read more than once"),
    ]:
        with pytest.raises(error, match=message):
            recompute.checked(*arguments, reused=reused)
    recompute.checked(iter([x]), None, None)  # read once: fine
    # A callback's attributes as they are when it runs, checked again.
    callback = types.SimpleNamespace(bn_data=None, bn_steps=2,
                                     bn_batch_size=None)
    with pytest.raises(ValueError, match="`bn_steps` is given"):
        recompute.of(callback)
    callback.bn_data = x
    assert recompute.of(callback).verbose == 0
    # Without data it writes nothing and runs nothing.
    empty = recompute.checked(None, None, None)
    assert empty.variables(model) == []
    empty.run(None)
    # With data: `update_bn`'s statistics over the batches asked for.
    _garble([norm])
    bn = recompute.checked(x, 2, 16, verbose=0)
    assert [id(v) for v in bn.variables(model)] == [
        id(norm.moving_mean), id(norm.moving_variance)
    ]
    bn.run(model)
    _assert_statistics(norm, x, (16, 16))
