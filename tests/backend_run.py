"""One SWA training run, for the cross-backend and multi-device tests.

Run as `KERAS_BACKEND=... python -m tests.backend_run IN.npz OUT.npz
[--data_parallel]`: `IN.npz` holds the data (`x`, `y`) and the model's
initial weights (`weight_0`, ...), so that every backend starts from the same
numbers; `OUT.npz` gets the averages, the counter, the raw weights after
`fit` and the BatchNormalization statistics recomputed for the average.
With `--data_parallel` (JAX only) the run is spread over all devices with
`keras.distribution.DataParallel`.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_swa  # noqa: E402

BATCH_SIZE = 16


def build_model(features):
    return keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(1),
        ]
    )


def train(inputs):
    """Trains from the initial weights in `inputs`; returns the results."""
    x, y = inputs["x"], inputs["y"]
    model = build_model(x.shape[1])
    model.set_weights(
        [inputs[f"weight_{i}"] for i in range(len(model.weights))]
    )
    opt = keras_swa.SWA(
        keras.optimizers.SGD(0.05, momentum=0.9),
        start_averaging=2,
        average_period=3,
    )
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=3, shuffle=False, verbose=0)
    results = {
        "n_averaged": np.int64(opt.n_averaged.numpy()),
        **{f"raw_{i}": v.numpy() for i, v in enumerate(model.weights)},
        **{
            f"average_{i}": a.numpy()
            for i, a in enumerate(opt.average_variables)
        },
    }
    keras_swa.assign_average(model, bn_data=x, verbose=0)
    results.update(
        {f"swa_{i}": v.numpy() for i, v in enumerate(model.weights)}
    )
    return results


def main(argv):
    source, target = argv[1], argv[2]
    devices = 1
    if "--data_parallel" in argv[3:]:
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=devices)
        )
        devices = len(devices)
    with np.load(source) as file:
        inputs = dict(file)
    np.savez(target, num_devices=np.int64(devices), **train(inputs))


if __name__ == "__main__":
    main(sys.argv)
