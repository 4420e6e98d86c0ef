"""One worker of the MultiWorkerMirroredStrategy test in test_distribute.py.

Usage: distribute_worker.py INITIAL_WEIGHTS.npz RESULT.npz, with TF_CONFIG
set. Trains the test's model with SWA, then with EMA, from the given weights
on the test's global batches (this worker computes its half of each), assigns
the average with BatchNormalization statistics recomputed, and writes the
averages, `n_averaged` and the final weights of each.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_swa  # noqa: E402
from test_distribute import _data  # noqa: E402
from test_distribute import _model  # noqa: E402
from test_distribute import _wrapper  # noqa: E402
from test_distribute import BATCH  # noqa: E402
from test_distribute import EPOCHS  # noqa: E402


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


def main(initial_path, result_path):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with np.load(initial_path) as file:
        initial = [file[f"arr_{i}"] for i in range(len(file.files))]
    result = {}
    for kind in ("swa", "ema"):
        result.update(_train(strategy, kind, initial))
    np.savez(result_path, **result)


if __name__ == "__main__":
    main(*sys.argv[1:])
