"""Averaging under `tf.distribute`: the same model as on one device.

MirroredStrategy runs here on the two logical CPU devices that conftest.py
creates; MultiWorkerMirroredStrategy runs in two worker processes on
127.0.0.1 (tests/distribute_worker.py). Each distributed run starts from the
weights of a single-device model and sees the same unshuffled global batches,
so its averages and BatchNormalization statistics must match the
single-device run up to the order of reductions.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_swa

pytestmark = [
    pytest.mark.tensorflow_only,
    pytest.mark.skipif(
        keras.backend.backend() != "tensorflow",
        reason="tf.distribute is TensorFlow's",
    ),
]

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

RTOL, ATOL = 1e-5, 1e-6
EPOCHS, BATCH = 2, 16  # 64 samples: 4 global batches an epoch.
CALLBACK_EPOCHS = 3
EPSILON = 1e-3  # BatchNormalization's default.
WORKER = os.path.join(os.path.dirname(__file__), "distribute_worker.py")


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (64, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1)) + 0.5).astype("float32")
    return x, y


def _model(synchronized=True):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, name="hidden_dense")(inputs)
    hidden = keras.layers.BatchNormalization(
        synchronized=synchronized, name="norm"
    )(hidden)
    hidden = keras.layers.ReLU()(hidden)
    return keras.Model(inputs, keras.layers.Dense(1)(hidden))


def _dataset():
    # Unshuffled: the distributed run splits the same global batches.
    return tf.data.Dataset.from_tensor_slices(_data()).batch(BATCH)


def callback(bn_data):
    """The StochasticWeightAveraging callback of the callback tests."""
    return keras_swa.StochasticWeightAveraging(
        start_epoch=1, swa_lr=0.02, bn_data=bn_data, verbose=0
    )


def _wrapper(kind):
    inner = keras.optimizers.SGD(0.05, momentum=0.9)
    if kind == "swa":
        return keras_swa.SWA(inner, start_averaging=1, average_period=2)
    return keras_swa.EMA(inner, decay=0.8, warmup=True)


@pytest.fixture(scope="module")
def strategy():
    # One strategy for all tests: each new MirroredStrategy numbers its
    # collective operations from the same start, and a process that ran
    # another one's collectives then fails on a shape mismatch.
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs the two logical CPU devices of conftest.py")
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def _replicas(strategy, variable):
    """The per-replica copies of a model or optimizer variable, as NumPy."""
    return [
        np.asarray(value)
        for value in strategy.experimental_local_results(variable.value)
    ]


def _assert_replicas_equal(strategy, variables):
    for variable in variables:
        first, *others = _replicas(strategy, variable)
        assert len(others) == strategy.num_replicas_in_sync - 1
        for other in others:
            np.testing.assert_array_equal(other, first, err_msg=variable.path)


def _trained(strategy, kind, initial_weights=None, synchronized=True):
    keras.utils.set_random_seed(0)
    scope = strategy.scope() if strategy else contextlib.nullcontext()
    with scope:
        model = _model(synchronized)
        if initial_weights is not None:
            model.set_weights(initial_weights)
        initial = model.get_weights()
        optimizer = _wrapper(kind)
        model.compile(optimizer=optimizer, loss="mse")
    model.fit(_dataset(), epochs=EPOCHS, verbose=0, shuffle=False)
    return model, optimizer, initial


def _bn_reference(model, x):
    """update_bn's statistics by NumPy: batches of 32, as `predict`."""
    kernel, bias = model.get_layer("hidden_dense").get_weights()
    hidden = x @ kernel + bias
    batches = [hidden[i : i + 32] for i in range(0, len(hidden), 32)]
    sizes = np.array([len(b) for b in batches], "float64")[:, None]
    means = np.stack([b.mean(0) for b in batches])
    variances = np.stack([b.var(0) for b in batches])
    return (
        (sizes * means).sum(0) / sizes.sum(),
        (sizes * variances).sum(0) / sizes.sum(),
    )


@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_wrapper_and_assign_average_match_one_device(strategy, kind):
    x, _ = _data()
    single, single_opt, initial = _trained(None, kind)
    mirrored, mirrored_opt, _ = _trained(strategy, kind, initial)

    assert int(mirrored_opt.n_averaged.numpy()) == int(
        single_opt.n_averaged.numpy()
    )
    assert int(single_opt.n_averaged.numpy()) > 1
    _assert_replicas_equal(strategy, mirrored_opt.average_variables)
    for expected, average in zip(
        single_opt.average_variables, mirrored_opt.average_variables
    ):
        for replica in _replicas(strategy, average):
            np.testing.assert_allclose(
                replica, expected.numpy(), rtol=RTOL, atol=ATOL
            )

    keras_swa.assign_average(single, bn_data=x, verbose=0)
    keras_swa.assign_average(mirrored, bn_data=x, verbose=0)
    _assert_replicas_equal(strategy, mirrored.variables)
    for expected, variable in zip(single.variables, mirrored.variables):
        np.testing.assert_allclose(
            variable.numpy(), expected.numpy(), rtol=RTOL, atol=ATOL
        )
    norm = mirrored.get_layer("norm")
    mean, variance = _bn_reference(mirrored, x)
    np.testing.assert_allclose(norm.moving_mean.numpy(), mean, rtol=RTOL)
    np.testing.assert_allclose(
        norm.moving_variance.numpy(), variance, rtol=RTOL
    )


def _fit_with_callback(strategy, initial_weights=None, fit_in_scope=False):
    keras.utils.set_random_seed(0)
    scope = strategy.scope() if strategy else contextlib.nullcontext()
    with scope:
        model = _model()
        if initial_weights is not None:
            model.set_weights(initial_weights)
        initial = model.get_weights()
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    swa = callback(_data()[0])
    scope = strategy.scope() if fit_in_scope else contextlib.nullcontext()
    with scope:
        model.fit(
            _dataset(),
            epochs=CALLBACK_EPOCHS,
            verbose=0,
            shuffle=False,
            callbacks=[swa],
        )
    return model, swa, initial


# `fit` inside the scope: the callback then folds in in cross-replica
# context, where there is no replica context to merge from.
@pytest.mark.parametrize("fit_in_scope", [False, True])
def test_callback_matches_one_device(strategy, fit_in_scope):
    single, single_callback, initial = _fit_with_callback(None)
    mirrored, mirrored_callback, _ = _fit_with_callback(
        strategy, initial, fit_in_scope
    )
    assert int(mirrored_callback.n_averaged.numpy()) == 2
    _assert_replicas_equal(strategy, mirrored.variables)
    for expected, variable in zip(single.variables, mirrored.variables):
        np.testing.assert_allclose(
            variable.numpy(), expected.numpy(), rtol=RTOL, atol=ATOL
        )


@pytest.mark.parametrize("in_scope", [False, True])
def test_update_bn_unsynchronized_gives_global_statistics(strategy, in_scope):
    # In training, each replica's unsynchronized BatchNormalization keeps
    # moving statistics of its own shards, so the replicas' copies differ;
    # update_bn replaces them on every replica with the statistics over the
    # whole data, as on one device.
    x, _ = _data()
    single, _, initial = _trained(None, "swa", synchronized=False)
    with strategy.scope():
        mirrored = _model(synchronized=False)
        mirrored.set_weights(initial)
        mirrored.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    mirrored.fit(_dataset(), epochs=1, verbose=0, shuffle=False)
    norm = mirrored.get_layer("norm")
    first, second = _replicas(strategy, norm.moving_mean)
    assert not np.allclose(first, second)
    # The single-device weights, keeping the diverged statistics.
    for variable, weight in zip(
        mirrored.trainable_variables, single.trainable_variables
    ):
        variable.assign(weight)

    keras_swa.update_bn(single, x, verbose=0)
    with strategy.scope() if in_scope else contextlib.nullcontext():
        keras_swa.update_bn(mirrored, x, verbose=0)

    mean, variance = _bn_reference(single, x)
    for expected, variable in [
        (mean, norm.moving_mean),
        (variance, norm.moving_variance),
    ]:
        replicas = _replicas(strategy, variable)
        assert len(replicas) == 2
        for replica in replicas:
            np.testing.assert_array_equal(replica, replicas[0])
            np.testing.assert_allclose(replica, expected, rtol=RTOL)
    single_norm = single.get_layer("norm")
    np.testing.assert_allclose(
        norm.moving_variance.numpy(),
        single_norm.moving_variance.numpy(),
        rtol=RTOL,
        atol=ATOL,
    )


class _ShardProbe(keras.layers.Layer):
    """Passes its input through; fails in the graph if a call sees more
    than `max_batch` samples, and records the replica context of each trace.

    `update_bn` must run data-parallel: each replica one shard of a batch.
    """

    def __init__(self, max_batch, traces=None, **kwargs):
        super().__init__(**kwargs)
        self.max_batch = max_batch
        # A bound method: Keras would track (and copy) a list attribute.
        self.record = (traces if traces is not None else []).append

    def call(self, x):
        context = tf.distribute.get_replica_context()
        self.record(
            None
            if context is None
            else int(tf.get_static_value(context.replica_id_in_sync_group))
        )
        check = tf.debugging.assert_less_equal(
            tf.shape(x)[0],
            self.max_batch,
            message="a call saw more than one replica's shard",
        )
        with tf.control_dependencies([check]):
            return tf.identity(x)


def _probed_model(max_batch, synchronized, traces=None):
    inputs = keras.Input((4,))
    hidden = _ShardProbe(max_batch, traces)(inputs)
    hidden = keras.layers.Dense(8, name="hidden_dense")(hidden)
    hidden = keras.layers.BatchNormalization(
        synchronized=synchronized, name="norm"
    )(hidden)
    hidden = keras.layers.ReLU()(hidden)
    hidden = keras.layers.Dense(3, name="second_dense")(hidden)
    hidden = keras.layers.BatchNormalization(
        synchronized=synchronized, name="second_norm"
    )(hidden)
    # After the last statistics (its masks differ between one device and
    # two): its seed state is carried from batch to batch on the replicas.
    hidden = keras.layers.Dropout(0.5)(hidden)
    return keras.Model(inputs, keras.layers.Dense(1)(hidden))


def _bn_reference_batches(model, x, batch_size):
    """Both layers' statistics by NumPy, batches of `batch_size`."""
    kernel, bias = model.get_layer("hidden_dense").get_weights()
    norm = model.get_layer("norm")
    kernel2, bias2 = model.get_layer("second_dense").get_weights()
    gamma, beta = norm.gamma.numpy(), norm.beta.numpy()
    sums = {name: [0.0, 0.0] for name in ("norm", "second_norm")}
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size].astype("float64")
        hidden = batch @ kernel + bias
        mean, variance = hidden.mean(0), hidden.var(0)
        sums["norm"][0] += len(batch) * mean
        sums["norm"][1] += len(batch) * variance
        normed = (hidden - mean) / np.sqrt(variance + EPSILON) * gamma + beta
        second = np.maximum(normed, 0.0) @ kernel2 + bias2
        sums["second_norm"][0] += len(batch) * second.mean(0)
        sums["second_norm"][1] += len(batch) * second.var(0)
    return {
        name: (mean_sum / len(x), variance_sum / len(x))
        for name, (mean_sum, variance_sum) in sums.items()
    }


# 49 samples in batches of 16: the last batch holds one sample, so one
# replica's shard of it is empty.
@pytest.mark.parametrize(
    "synchronized, form, in_scope",
    [
        (synchronized, form, False)
        for synchronized in (False, True)
        for form in ("arrays", "dataset", "generator")
    ]
    # Inside the scope too (the pass is the same: one form is enough).
    + [(False, "arrays", True), (True, "arrays", True)],
)
def test_update_bn_data_parallel_matches_one_device(
    strategy, synchronized, form, in_scope
):
    # Each replica runs the model on its shard of each batch (half of it:
    # the probe fails in the graph on more), and the replicas' moments are
    # combined into those of the whole batch, between-shard spread included:
    # the statistics of the single-device pass over the same batches, for
    # synchronized and unsynchronized layers alike.
    rng = np.random.default_rng(1)
    # Far from zero mean, so that a lost between-shard spread or a
    # cancellation would show.
    x = rng.normal(3.0, 2.0, (49, 4)).astype("float32")
    keras.utils.set_random_seed(0)
    single = _probed_model(BATCH, synchronized)
    traces = []
    with strategy.scope():
        mirrored = _probed_model(BATCH // 2, synchronized, traces)
    mirrored.set_weights(single.get_weights())
    del traces[:]  # those of building the model
    data = {
        "arrays": lambda: x,
        "dataset": lambda: tf.data.Dataset.from_tensor_slices(x).batch(BATCH),
        "generator": lambda: (
            x[i : i + BATCH] for i in range(0, len(x), BATCH)
        ),
    }[form]
    batch_size = BATCH if form == "arrays" else None

    keras_swa.update_bn(single, data(), verbose=0, batch_size=batch_size)
    with strategy.scope() if in_scope else contextlib.nullcontext():
        keras_swa.update_bn(mirrored, data(), verbose=0, batch_size=batch_size)

    assert sorted(set(traces)) == [0, 1], traces  # both replicas ran
    reference = _bn_reference_batches(single, x, BATCH)
    for name, (mean, variance) in reference.items():
        single_norm = single.get_layer(name)
        norm = mirrored.get_layer(name)
        for expected, variable, single_variable in [
            (mean, norm.moving_mean, single_norm.moving_mean),
            (variance, norm.moving_variance, single_norm.moving_variance),
        ]:
            np.testing.assert_allclose(
                single_variable.numpy(), expected, rtol=RTOL, atol=ATOL
            )
            for replica in _replicas(strategy, variable):
                np.testing.assert_array_equal(
                    replica, _replicas(strategy, variable)[0]
                )
                np.testing.assert_allclose(
                    replica, single_variable.numpy(), rtol=RTOL, atol=ATOL
                )


@pytest.mark.parametrize("synchronized", [True, False])
def test_averaged_weights_swaps_every_replica(strategy, synchronized):
    # Unsynchronized BatchNormalization leaves different statistics on each
    # replica: each gets its own back on exit.
    x, _ = _data()
    model, optimizer, _ = _trained(strategy, "swa", synchronized=synchronized)
    raw = {v.path: _replicas(strategy, v) for v in model.variables}
    first, second = raw[model.get_layer("norm").moving_mean.path]
    assert np.array_equal(first, second) == synchronized
    averages = [a.numpy() for a in optimizer.average_variables]
    with keras_swa.averaged_weights(model, bn_data=x, verbose=0):
        _assert_replicas_equal(strategy, model.variables)
        for variable, average in zip(model.trainable_variables, averages):
            for replica in _replicas(strategy, variable):
                np.testing.assert_array_equal(replica, average)
        mean, _ = _bn_reference(model, x)
        for replica in _replicas(strategy, model.get_layer("norm").moving_mean):
            np.testing.assert_allclose(replica, mean, rtol=RTOL, atol=ATOL)
    for variable in model.variables:
        for replica, expected in zip(
            _replicas(strategy, variable), raw[variable.path]
        ):
            np.testing.assert_array_equal(replica, expected)


def _scope(strategy, inside):
    return strategy.scope() if inside else contextlib.nullcontext()


@pytest.mark.parametrize(
    "model_in, wrapper_in, compile_in, fit_in",
    [
        (True, False, False, False),  # wrapper outside, model inside
        (True, False, True, True),
        (False, True, True, True),  # model outside, wrapper inside
        (False, True, True, False),
        (False, False, True, True),  # both outside, trained inside
    ],
)
def test_wrapper_and_model_of_different_scopes_raise(
    strategy, model_in, wrapper_in, compile_in, fit_in
):
    x, y = _data()
    with _scope(strategy, model_in):
        model = _model()
    with _scope(strategy, wrapper_in):
        optimizer = keras_swa.SWA(keras.optimizers.SGD(0.05))
    with _scope(strategy, compile_in):
        model.compile(optimizer=optimizer, loss="mse")
    with _scope(strategy, fit_in):
        with pytest.raises(ValueError, match=r"strategy\.scope\(\)"):
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)


def test_functions_in_another_strategy_scope_raise(strategy):
    x, _ = _data()
    model, _, _ = _trained(strategy, "swa")
    other = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    before = [v.numpy() for v in model.variables]
    with other.scope():
        with pytest.raises(ValueError, match=r"another tf\.distribute"):
            keras_swa.update_bn(model, x, verbose=0)
        with pytest.raises(ValueError, match=r"another tf\.distribute"):
            keras_swa.assign_average(model, verbose=0)
        with pytest.raises(ValueError, match=r"another tf\.distribute"):
            with keras_swa.averaged_weights(model):
                pass
    for expected, variable in zip(before, model.variables):
        np.testing.assert_array_equal(variable.numpy(), expected)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="module")
def multi_worker_results(tmp_path_factory):
    """The results of the two workers of tests/distribute_worker.py, which
    train from the single-device model's initial weights."""
    tmp_path = tmp_path_factory.mktemp("multi_worker")
    keras.utils.set_random_seed(0)
    np.savez(tmp_path / "initial.npz", *_model().get_weights())

    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        for index in range(2):
            env = dict(os.environ)
            env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            )
            env["PYTHONPATH"] = os.pathsep.join(
                [root] + [p for p in [env.get("PYTHONPATH")] if p]
            )
            env["CUDA_VISIBLE_DEVICES"] = ""
            log = open(tmp_path / f"worker{index}.log", "wb")
            workers.append(
                (
                    subprocess.Popen(
                        [
                            sys.executable,
                            WORKER,
                            str(tmp_path / "initial.npz"),
                            str(tmp_path / f"result{index}.npz"),
                        ],
                        env=env,
                        cwd=root,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    ),
                    log,
                )
            )
        for index, (process, _) in enumerate(workers):
            try:
                code = process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                code = "timeout"
            if code != 0:
                log = (tmp_path / f"worker{index}.log").read_text()
                pytest.fail(f"worker {index} ended with {code}:\n{log[-3000:]}")
    finally:
        for process, log in workers:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
            log.close()
    results = []
    for index in range(2):
        with np.load(tmp_path / f"result{index}.npz") as result:
            results.append(dict(result))
    return results


def _assert_workers_match(results, kind, n_averaged, averages, weights):
    for result in results:
        assert int(result[f"{kind}_n_averaged"]) == n_averaged
        for i, average in enumerate(averages):
            np.testing.assert_allclose(
                result[f"{kind}_average_{i}"], average, rtol=RTOL, atol=ATOL
            )
        # After assign_average with bn_data: the averaged weights and the
        # recomputed (global) BatchNormalization statistics.
        for i, weight in enumerate(weights):
            np.testing.assert_allclose(
                result[f"{kind}_weight_{i}"], weight, rtol=RTOL, atol=ATOL
            )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_multi_worker_mirrored_matches_one_device(multi_worker_results, kind):
    """The workers' own train step (`strategy.run`) with a wrapper."""
    x, _ = _data()
    single, single_opt, _ = _trained(None, kind)
    keras_swa.assign_average(single, bn_data=x, verbose=0)
    _assert_workers_match(
        multi_worker_results,
        kind,
        int(single_opt.n_averaged.numpy()),
        [a.numpy() for a in single_opt.average_variables],
        single.get_weights(),
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["swa", "ema", "callback"])
def test_multi_worker_fit_matches_one_device(multi_worker_results, kind):
    """`model.fit` on the workers, with the workarounds for Keras 3.15 that
    tests/distribute_worker.py describes, with a wrapper or the callback."""
    x, _ = _data()
    if kind == "callback":
        single, source, _ = _fit_with_callback(None)
    else:
        single, source, _ = _trained(None, kind)
        keras_swa.assign_average(single, bn_data=x, verbose=0)
    n_averaged = int(source.n_averaged.numpy())
    assert n_averaged > 1
    _assert_workers_match(
        multi_worker_results,
        f"fit_{kind}",
        n_averaged,
        [a.numpy() for a in source.average_variables],
        single.get_weights(),
    )


@pytest.mark.slow
def test_keras_fit_still_needs_the_multi_worker_workarounds(
    multi_worker_results,
):
    """Keras 3.15's `fit` fails under MultiWorkerMirroredStrategy without the
    workarounds of tests/distribute_worker.py (keras-team/keras#20585). When
    this test fails, a Keras release fixed it: drop the workaround."""
    for result in multi_worker_results:
        # A model created in the scope builds itself on a batch reduced over
        # the workers, a nest the strategy cannot reduce.
        assert "PerReplica" in str(result["keras_fit_error_model_in_scope"])
        # Scalar logs reduced over the workers along axis 0.
        assert "Invalid reduction dimension 0" in str(
            result["keras_fit_error_scalar_logs"]
        )
