"""Every averager on a sharded model, for tests/test_sharding.py.

Run as `XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax
python -m tests.sharding_run OUT.npz`: JAX fixes its devices when it starts,
hence a process of its own. Each averager trains the same model from the
same initial weights twice in this process, once on one device (no
distribution) and once under `keras.distribution.ModelParallel` on a 2 x 4
mesh ("batch" x "model"), its kernels, biases and BatchNormalization
variables sharded 4 ways over "model". `OUT.npz` gets, under the keys
`<kind>/<run>/<what>` (`run` is `single` or `sharded`):

- `average_<i>`, `n_averaged`: the averages after `fit` (ScheduleFree: its
  `z`s);
- `bn_weights_<i>`: the model's weights inside `averaged_weights(...,
  bn_data=x)` (averages, statistics recomputed), `restored`: whether the raw
  weights came back bit for bit after the block;
- `assigned_<i>`: the weights after `assign_average` then `update_bn`;
- `loaded_<i>` (wrappers): the averages of the model saved after `fit` and
  loaded back;
- `sampled_<i>` (SWAG): the model's weights inside `sampled_weights(...,
  bn_data=x)`, and `restored` after it; `noise_<i>` and
  `noise_reference_<i>`: the noise SWAG draws for mean `i`, and an unsharded
  `keras.random.normal` of the same seed;

and, for the sharded run only, the shardings as found on the arrays
(`variable.value.sharding`): `weight_spec_<i>` and `average_spec_<i>` (the
`PartitionSpec`s as strings; every average the averager keeps: all profiles
of PostHocEMA, SWAG's moments and deviations), `equivalent_<i>` (whether the
average's sharding is equivalent to its weight's), `mapped_<i>` (whether a
pattern of the layout map matches the average's path), `inside_spec_<i>`
(the weights' inside `averaged_weights` or `sampled_weights`),
`loaded_spec_<i>`, `noise_spec_<i>` and `noise_on_every_device_<i>` (SWAG's
noise), the per-device bytes of the weights and of the averages,
and `collectives` (the collective operations of the compiled train step, as
in `plain/sharded/collectives` for an optimizer without averaging).
"""

import os
import re
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_swa  # noqa: E402
from keras_swa._backend import random as backend_random  # noqa: E402

BATCH_SIZE = 16
EPOCHS = 3
KINDS = (
    "plain", "swa", "ema", "power_ema", "posthoc_ema", "callback", "swag",
    "schedule_free",
)
MAX_RANK = 2
# Collectives of the compiled HLO, with their result shapes.
_COLLECTIVE = re.compile(
    r"= (\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute|collective-broadcast)(?:-start)?\("
)


def build_model():
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(32, activation="relu", name="dense_in"),
            keras.layers.BatchNormalization(name="norm"),
            keras.layers.Dense(12, name="dense_out"),
        ],
        name="sharded",
    )


def layout_map():
    """Kernels and biases sharded 4 ways over "model", batches 2 ways.

    The patterns match the model's variable paths only (`fullmatch`), not
    the averages' names: an average sharded like its weight is sharded by
    the layout it was given, not by a pattern of this map. The model's name
    is optional in them: a loaded `Sequential` names its variables without
    it (`dense_in/kernel`, where the trained one had
    `sharded/dense_in/kernel`).
    """
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    layouts = keras.distribution.LayoutMap(mesh)
    layouts[r"(.*/)?dense_\w+/kernel"] = (None, "model")
    layouts[r"(.*/)?dense_\w+/bias"] = ("model",)
    layouts[r"(.*/)?norm/\w+"] = ("model",)
    return layouts


def _inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(64, 8)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(8, 12)))).astype("float32")
    keras.utils.set_random_seed(0)
    weights = build_model().get_weights()
    # BatchNormalization starts from statistics of its own, not 0 and 1.
    weights[4] = rng.normal(size=weights[4].shape).astype("float32")
    weights[5] = rng.uniform(0.5, 2.0, weights[5].shape).astype("float32")
    return x, y, weights


def _averager(kind, x):
    """The optimizer, the callbacks and the source of averages of `kind`."""
    inner = keras.optimizers.SGD(0.05, momentum=0.9)
    if kind == "plain":
        return inner, [], None
    if kind in ("callback", "swag"):
        arguments = dict(start_epoch=1, swa_lr=0.02, bn_data=x, verbose=0)
        if kind == "swag":
            callback = keras_swa.SWAG(max_rank=MAX_RANK, **arguments)
        else:
            callback = keras_swa.StochasticWeightAveraging(**arguments)
        return inner, [callback], callback
    if kind == "swa":
        optimizer = keras_swa.SWA(inner, start_averaging=2, average_period=3)
    elif kind == "ema":
        optimizer = keras_swa.EMA(inner, decay=0.8, warmup=True)
    elif kind == "power_ema":
        optimizer = keras_swa.PowerEMA(inner, sigma_rel=0.1)
    elif kind == "schedule_free":
        # A base step without momentum of its own; its state is z.
        optimizer = keras_swa.ScheduleFree(keras.optimizers.SGD(0.05))
    else:
        optimizer = keras_swa.PostHocEMA(inner, sigma_rels=(0.05, 0.2))
    source = optimizer.profiles[1] if kind == "posthoc_ema" else optimizer
    return optimizer, [], source


def _all_averages(optimizer, source):
    """Every average the averager keeps (all profiles of PostHocEMA; SWAG's
    mean, variance and deviation columns; ScheduleFree's z, from which its
    average x is recovered)."""
    if isinstance(source, keras_swa.ScheduleFree):
        return list(source.z_variables)
    if isinstance(source, keras_swa.SWAG):
        return [
            *source.average_variables,
            *source.variance_variables,
            *(v for columns in source.deviation_variables for v in columns),
        ]
    if isinstance(optimizer, keras_swa.PostHocEMA):
        return [
            average
            for profile in optimizer.profiles
            for average in profile.average_variables
        ]
    return list(source.average_variables)


def _spec(variable):
    return str(variable.value.sharding.spec)


def _device_bytes(variables):
    """The bytes the variables take on the first device."""
    device = jax.devices()[0]
    return sum(
        shard.data.nbytes
        for variable in variables
        for shard in variable.value.addressable_shards
        if shard.device == device
    )


def _collectives(model, x, y):
    """The collectives of the compiled train step, sorted.

    `train_step`, `_get_jax_state`, `_get_state_sharding_spec` and
    `_distribute_data` are Keras' own (private) pieces of `fit` on JAX: the
    step is compiled here exactly as `fit` compiles it, to read its HLO.
    """
    from keras.src.backend.jax.trainer import _distribute_data

    state = model._get_jax_state(True, True, True, True)
    step = jax.jit(
        model.train_step,
        out_shardings=(None, model._get_state_sharding_spec()),
    )
    data = _distribute_data((x[:BATCH_SIZE], y[:BATCH_SIZE], None))
    text = step.lower(state, data).compile().as_text()
    return np.array(sorted(" ".join(m) for m in _COLLECTIVE.findall(text)))


def run(kind, inputs, layouts, directory):
    """Trains with the averager `kind`; returns its results."""
    x, y, weights = inputs
    result = {}
    sharded = layouts is not None
    keras.utils.set_random_seed(0)
    model = build_model()
    model.set_weights(weights)
    optimizer, callbacks, source = _averager(kind, x)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(
        x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, shuffle=False, verbose=0,
        callbacks=callbacks,
    )
    if sharded:
        result["collectives"] = _collectives(model, x, y)
        result["weight_bytes"] = np.int64(
            _device_bytes(model.trainable_variables)
        )
        result["weight_total_bytes"] = np.int64(
            sum(v.value.nbytes for v in model.trainable_variables)
        )
        for i, variable in enumerate(model.trainable_variables):
            result[f"weight_spec_{i}"] = _spec(variable)
    if source is None:
        return result

    averages = _all_averages(optimizer, source)
    result["n_averaged"] = np.int64(source.n_averaged.numpy())
    for i, average in enumerate(averages):
        result[f"average_{i}"] = average.numpy()
    if sharded:
        result["average_bytes"] = np.int64(_device_bytes(averages))
        result["average_total_bytes"] = np.int64(
            sum(a.value.nbytes for a in averages)
        )
        variables = model.trainable_variables * (
            len(averages) // len(model.trainable_variables)
        )
        for i, (variable, average) in enumerate(zip(variables, averages)):
            result[f"average_spec_{i}"] = _spec(average)
            sharding = average.value.sharding
            result[f"equivalent_{i}"] = sharding.is_equivalent_to(
                variable.value.sharding, variable.value.ndim
            )
            # The layout map would replicate a variable of that path: the
            # sharding came with the average's own layout.
            result[f"mapped_{i}"] = (
                layouts[average.path] is not None
            )

    if kind in ("callback", "swag"):
        # The callback assigned the average and recomputed BatchNorm already.
        for i, weight in enumerate(model.get_weights()):
            result[f"assigned_{i}"] = weight
        if kind == "swag":
            # SWAG's noise is drawn like each mean: shard by shard, the
            # numbers of an unsharded draw.
            for i, mean in enumerate(source._averages.averages):
                noise = backend_random.normal_like(mean.value, seed=11)
                result[f"noise_{i}"] = np.asarray(noise)
                result[f"noise_reference_{i}"] = np.asarray(
                    keras.random.normal(mean.shape, dtype=mean.dtype, seed=11)
                )
                if sharded:
                    # A draw on one device has no spec: its class's name.
                    result[f"noise_spec_{i}"] = str(
                        getattr(noise.sharding, "spec", type(noise.sharding).__name__)
                    )
                    result[f"noise_on_every_device_{i}"] = (
                        noise.sharding.device_set == mean.value.sharding.device_set
                    )
            if sharded:
                # Another seed reuses the compiled draws: one compilation
                # per shape and sharding, not one per call.
                before = backend_random._sharded_draw.cache_info().misses
                for mean in source._averages.averages:
                    backend_random.normal_like(mean.value, seed=12)
                result["noise_compilations_for_a_new_seed"] = np.int64(
                    backend_random._sharded_draw.cache_info().misses - before
                )
            with keras_swa.sampled_weights(model, source, seed=3, bn_data=x):
                for i, variable in enumerate(model.weights):
                    result[f"sampled_{i}"] = variable.numpy()
                    if sharded:
                        result[f"inside_spec_{i}"] = _spec(variable)
            result["restored"] = all(
                np.array_equal(before, after.numpy())
                for before, after in zip(
                    [result[f"assigned_{i}"] for i in range(8)],
                    model.weights,
                )
            )
        return result

    raw = model.get_weights()
    for i, weight in enumerate(raw):
        result[f"raw_{i}"] = weight
    with keras_swa.averaged_weights(model, source, bn_data=x, verbose=0):
        for i, variable in enumerate(model.weights):
            result[f"bn_weights_{i}"] = variable.numpy()
            if sharded:
                result[f"inside_spec_{i}"] = _spec(variable)
    result["restored"] = all(
        np.array_equal(before, after)
        for before, after in zip(raw, model.get_weights())
    )

    path = os.path.join(directory, f"{kind}_{int(sharded)}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for i, average in enumerate(_all_averages(
        loaded.optimizer,
        loaded.optimizer.profiles[1] if kind == "posthoc_ema"
        else loaded.optimizer,
    )):
        result[f"loaded_{i}"] = average.numpy()
        if sharded:
            result[f"loaded_spec_{i}"] = _spec(average)

    keras_swa.assign_average(model, source)
    keras_swa.update_bn(model, x, verbose=0)
    for i, weight in enumerate(model.get_weights()):
        result[f"assigned_{i}"] = weight
    return result


def main(target):
    devices = len(jax.devices())
    inputs = _inputs()
    results = {"num_devices": np.int64(devices)}
    layouts = layout_map()
    distribution = keras.distribution.ModelParallel(
        layout_map=layouts, batch_dim_name="batch"
    )
    with tempfile.TemporaryDirectory() as directory:
        for kind in KINDS:
            for name in ("single", "sharded"):
                if name == "single":
                    result = run(kind, inputs, None, directory)
                else:
                    with distribution.scope():
                        result = run(kind, inputs, layouts, directory)
                results.update(
                    {f"{kind}/{name}/{key}": v for key, v in result.items()}
                )
    np.savez(target, **results)


if __name__ == "__main__":
    main(sys.argv[1])
