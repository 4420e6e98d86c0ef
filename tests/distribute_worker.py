"""One worker of the MultiWorkerMirroredStrategy tests in test_distribute.py.

Usage: distribute_worker.py INITIAL_WEIGHTS.npz RESULT.npz, with TF_CONFIG
set. Trains the test's model from the given weights on the test's global
batches (this worker computes its half of each), in two ways:

- its own train step (`strategy.run`), with SWA, then with EMA (keys
  `swa_...`, `ema_...`);
- `model.fit` with the workaround below for Keras 3.15, with SWA, EMA and
  the StochasticWeightAveraging callback (keys `fit_swa_...`,
  `fit_ema_...`, `fit_callback_...`);

assigns the average with BatchNormalization statistics recomputed, and writes
the averages, `n_averaged` and the final weights of each.

Keras 3.15's `fit` fails under MultiWorkerMirroredStrategy, also without
keras_swa (keras-team/keras#20585), in two places of its TensorFlow trainer:

1. Before the first step, a model created inside `strategy.scope()` builds
   itself on a batch averaged over the workers with `strategy.reduce("MEAN",
   (x, y))`; MultiWorkerMirroredStrategy reduces single values, not nests:
   "Attempt to convert a value (PerReplica...) to a Tensor". Workaround: the
   `keras.Model` object is created outside the scope (its layers, hence its
   variables, inside it, where the model is also compiled, its optimizer
   built, and `fit` called); Keras then skips that build.
2. After each step, the logs are averaged with `strategy.reduce("MEAN", v,
   axis=0)`, which fails on scalars ("Invalid reduction dimension 0 for
   input with 0 dimensions"). Workaround: `train_step`/`test_step` return
   the logs as vectors of one element (`VectorLogsModel`); the reduction
   then averages them over the workers into scalars.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_swa  # noqa: E402
from test_distribute import _data  # noqa: E402
from test_distribute import _dataset  # noqa: E402
from test_distribute import _model  # noqa: E402
from test_distribute import _wrapper  # noqa: E402
from test_distribute import BATCH  # noqa: E402
from test_distribute import CALLBACK_EPOCHS  # noqa: E402
from test_distribute import EPOCHS  # noqa: E402
from test_distribute import callback  # noqa: E402


class VectorLogsModel(keras.Model):
    """A functional model whose step logs are vectors of one element: Keras
    3.15 reduces the logs over the workers along axis 0, which scalars
    lack (workaround 2 of the module's docstring)."""

    def train_step(self, data):
        return _as_vectors(super().train_step(data))

    def test_step(self, data):
        return _as_vectors(super().test_step(data))


def _sharded_dataset():
    """The test's global batches, each worker taking its half of every one
    (what AUTO falls back to, with a warning, for data not read from
    files)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return _dataset().with_options(options)


def _as_vectors(logs):
    return {name: tf.reshape(value, (1,)) for name, value in logs.items()}


def _train(strategy, kind, initial):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = _model(synchronized=True)
        model.set_weights(initial)
        optimizer = _wrapper(kind)
        model.compile(optimizer=optimizer, loss="mse")
    # Keras 3.15's `fit` and `train_on_batch` fail under
    # MultiWorkerMirroredStrategy with one CPU per worker (their reductions
    # of distributed values raise on PerReplica values, before or after the
    # step), so the worker runs the train step itself: the model on this
    # worker's half of each global batch, the loss as a share of the global
    # batch mean, and the wrapper's `apply`, which sums the gradients over
    # the workers as in `fit`.
    index = strategy.cluster_resolver.task_id
    x, y = _data()
    half = BATCH // strategy.num_replicas_in_sync

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x, training=True) - y))
            loss = loss / BATCH
        variables = model.trainable_variables
        optimizer.apply(tape.gradient(loss, variables), variables)

    step = tf.function(lambda x, y: strategy.run(replica_step, args=(x, y)))
    for _ in range(EPOCHS):
        for start in range(0, len(x), BATCH):
            shard = slice(start + index * half, start + (index + 1) * half)
            step(tf.constant(x[shard]), tf.constant(y[shard]))

    result = {f"{kind}_n_averaged": np.int64(optimizer.n_averaged.numpy())}
    for i, average in enumerate(optimizer.average_variables):
        result[f"{kind}_average_{i}"] = average.numpy()
    keras_swa.assign_average(model, bn_data=x, verbose=0)
    for i, weight in enumerate(model.get_weights()):
        result[f"{kind}_weight_{i}"] = weight
    return result


def _fit(strategy, kind, initial):
    """`model.fit` with the workarounds of the module's docstring."""
    keras.utils.set_random_seed(0)
    with strategy.scope():
        layers = _model(synchronized=True)
    # Outside the scope: a model created in it fails in `fit` (workaround 1).
    model = VectorLogsModel(layers.inputs, layers.outputs)
    x, _ = _data()
    with strategy.scope():
        model.set_weights(initial)
        if kind == "callback":
            optimizer, callbacks = keras.optimizers.SGD(0.05), [callback(x)]
            epochs = CALLBACK_EPOCHS
        else:
            optimizer, callbacks, epochs = _wrapper(kind), [], EPOCHS
        model.compile(optimizer=optimizer, loss="mse")
        # Built before `fit`, since Keras does not build it there any more.
        optimizer.build(model.trainable_variables)
        model.fit(
            _sharded_dataset(), epochs=epochs, verbose=0, shuffle=False,
            callbacks=callbacks,
        )
    source = callbacks[0] if callbacks else optimizer
    kind = f"fit_{kind}"
    result = {f"{kind}_n_averaged": np.int64(source.n_averaged.numpy())}
    for i, average in enumerate(source.average_variables):
        result[f"{kind}_average_{i}"] = average.numpy()
    if not callbacks:
        # The callback assigned the average and recomputed BatchNorm itself.
        keras_swa.assign_average(model, bn_data=x, verbose=0)
    for i, weight in enumerate(model.get_weights()):
        result[f"{kind}_weight_{i}"] = weight
    return result


def main(initial_path, result_path):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with np.load(initial_path) as file:
        initial = [file[f"arr_{i}"] for i in range(len(file.files))]
    result = {}
    for kind in ("swa", "ema"):
        result.update(_train(strategy, kind, initial))
    for kind in ("swa", "ema", "callback"):
        result.update(_fit(strategy, kind, initial))
    result.update(_keras_fit_errors(strategy))
    np.savez(result_path, **result)


def _keras_fit_errors(strategy):
    """The errors of a plain Keras `fit` (no keras_swa) without each
    workaround: the test sees when a Keras release no longer needs them.
    Both fail while building or tracing, before any collective runs."""
    return {
        "keras_fit_error_model_in_scope": _keras_fit_error(
            strategy, VectorLogsModel, model_in_scope=True
        ),
        "keras_fit_error_scalar_logs": _keras_fit_error(
            strategy, keras.Model, model_in_scope=False
        ),
    }


def _keras_fit_error(strategy, model_class, model_in_scope):
    with strategy.scope():
        layers = _model(synchronized=True)
        if model_in_scope:
            model = model_class(layers.inputs, layers.outputs)
    if not model_in_scope:
        model = model_class(layers.inputs, layers.outputs)
    with strategy.scope():
        optimizer = keras.optimizers.SGD(0.05)
        model.compile(optimizer=optimizer, loss="mse")
        optimizer.build(model.trainable_variables)
        try:
            model.fit(_sharded_dataset(), epochs=1, verbose=0)
        except Exception as error:  # Any error: the test reports it.
            return f"{type(error).__name__}: {error}"
    return ""


if __name__ == "__main__":
    main(*sys.argv[1:])
