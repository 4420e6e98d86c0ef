r"""Measures what weight averaging costs, against the targets of DESIGN.md.

Every timing is taken in this one process, the variants interleaved round by
round, and the minimum of the rounds is reported (the median too, in the
JSON). The minimum, not the median: on a shared machine the same `fit` call
lands in one of (at least) two speed modes, about 42 or 65 ms per step on
the 2-core machine of BUILD_NOTES.md, and the median of a few rounds then
reports a "miss" that is only the mode; the minimum of interleaved rounds
compares each variant at its best, like with like.

Rows (a memory-heavy model of about 10M weights by default):
  update/*     one compiled optimizer update alone (fixed gradients):
               the bare inner optimizer, SWA on a step that takes no snapshot,
               SWA snapshotting every step, EMA every step, Keras' built-in
               `use_ema=True`, and `update/raw_pass`, the raw pass: one compiled
               `a += (w - a) / n` over all weights; SWA snapshotting every
               step with a window of 5 (`window=5`) and in host memory
               (`offload=True`; skipped, with the reason printed, where the
               backend refuses it), both held to `update/bare`; and
               `keras_swa.ScheduleFree(SGD(momentum=0))` held to its bare
               base step, `update/bare_sgd_no_momentum`.
  copy/*       one compiled copy of a float32 buffer the size of the weights
               into another, in place, timed interleaved with the update rows:
               the copy bandwidth (bytes read + written per second).
  fit/*        one whole `model.fit` step with and without the SWA wrapper.
  bn/*         `update_bn` over N batches of a conv net, and one compiled
               training-mode forward pass over the same N batches; with
               --bn_replicas=R (TensorFlow), `update_bn` of the same model
               data-parallel over R replicas of a MirroredStrategy.

Measures (of the minima; targets of DESIGN.md "## Measures"):
  SWA non-snapshot update / bare update                  <= 1.05
  fit step: SWA (no snapshot) / bare                     <= 1.01
  fit step: SWA every 10 / bare                          <= 1.02
  SWA snapshot extra / bandwidth floor                   <= 1.3
      extra = update/swa_every_step - update/bare; the bandwidth floor is
      3 x the bytes of the weights (read w, read and write the average)
      over the copy bandwidth
  SWA snapshot extra / raw pass                          <= 1.0
      never above one raw pass `a += (w - a) / n` (update/raw_pass)
  EMA every step / Keras use_ema                         <= 1.0
  update_bn / training-mode forward pass                 <= 1.2
  extra memory of SWA / trainable weights                <= 1.0
  update_bn: R replicas / one device (--bn_replicas)     no target
  ScheduleFree extra / bandwidth floor                   no target (report)
  SWA window=5 snapshot extra / bandwidth floor          no target (report)
  SWA offload snapshot extra / bandwidth floor           no target (report)
  SWA offload snapshot extra / on-device snapshot extra  no target (report)
      each floor counts the weight-sized arrays the extra work must read
      or write at the least (`FLOOR_ARRAYS`, with the reasons) over the
      copy bandwidth; the offload row also prints the effective rate at
      which its extra moves the weights over the host link
A missed target is printed as NO.

Usage:
  python -m examples.benchmark                 # full size, prints the table
  python -m examples.benchmark --small         # a quick run (make demo)
  python -m examples.benchmark --output=bench.json
  python -m examples.benchmark --bn_replicas=2  # TensorFlow: update_bn on 2 replicas
  python path/to/checkout/examples/benchmark.py --small   # from any folder
"""

import json
import os
import platform
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a file: python path/to/examples/benchmark.py
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if __name__ == "__main__":  # one line, not a traceback, without the extra
    from examples import _requirements

    _requirements.require("examples.benchmark", ("absl", "numpy", "keras"))

from absl import flags  # noqa: E402

from examples import _cli  # noqa: E402

# Keras, NumPy and keras_swa are imported in the functions that use them,
# after the flags are checked: a mistake is told at once, in one line.

PROG = "examples.benchmark"
FLAGS = flags.FLAGS


def define_flags():
    """Defines the flags, when run as a program only: imported (the tests
    import it beside `examples.train_flags`), it defines none, and two
    definitions of `--batch_size` do not collide."""
    flags.DEFINE_bool("small", False, "A quick run on a ~1M-weight model.")
    flags.DEFINE_integer("rounds", 7, "Interleaved rounds; the minimum is reported.")
    flags.DEFINE_integer("steps", 20, "Updates or fit steps timed per round.")
    flags.DEFINE_integer("batch_size", 32, "Batch size of the fit rows.")
    flags.DEFINE_integer("bn_batches", 20, "Batches of 32 images of the update_bn rows.")
    flags.DEFINE_string("output", None, "Write the results as JSON to this file.")
    flags.DEFINE_integer(
        "bn_replicas", 1,
        "TensorFlow only: with N >= 2, also times update_bn data-parallel on N replicas "
        "(a MirroredStrategy over N GPUs, or over the CPU split into N logical devices).",
    )


POSITIVE = ("rounds", "steps", "batch_size", "bn_batches", "bn_replicas")


def validate(values):
    """Checks the settings (a dict of flag values); raises `ValueError`
    naming the flag. Checks that `output` can be written, before the run."""
    for name in POSITIVE:
        if values[name] < 1:
            raise ValueError(f"--{name} must be an integer >= 1, got {values[name]}.")
    if values.get("output") is not None:
        _cli.check_output_file(values["output"], "output")


NEVER = 10**9  # a start_averaging that is never reached
COPY = "copy/weights_sized_buffer"  # the row of the copy bandwidth


def build_model(width, depth, features):
    import keras

    layers = [keras.Input((features,))]
    layers += [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
    layers.append(keras.layers.Dense(10))
    return keras.Sequential(layers)


def compiled(fn, variables, keep_unused=False):
    """`fn()`, compiled as the backend allows (the backend-specific lines).

    `fn` updates Keras variables in place and returns one of them.
    TensorFlow: `tf.function` with XLA. JAX: `jax.jit` of a stateless `fn`,
    the values of `variables` (all that `fn` reads or writes) in, donated,
    and their new values out. PyTorch: eager, under `torch.no_grad()`.
    `keep_unused` (JAX): keep a variable that `fn` only writes as an input
    of the jitted function, so that its donated buffer takes the new value
    in place (by default JAX drops an input that is not read, and the new
    value goes to a fresh buffer each call).
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    if backend == "torch":
        import torch

        def eager():
            with torch.no_grad():
                return fn()

        return eager
    if backend != "jax":
        raise NotImplementedError(f"No compiled rows for {backend}.")
    import jax

    variables = list(variables)

    def stateless(values):
        mapping = list(zip(variables, values))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            result = fn()
        new_values = [scope.get_current_value(v) for v in variables]
        return new_values, scope.get_current_value(result)

    # As Keras' JAX trainer: the state is donated, so that a value passed
    # through unchanged (the averages on a step without a snapshot) reuses
    # its buffer instead of being copied out.
    function = jax.jit(stateless, donate_argnums=0, keep_unused=keep_unused)

    def call():
        new_values, result = function([v.value for v in variables])
        for variable, value in zip(variables, new_values):
            variable.assign(value)
        return result

    return call


def compiled_forward(model):
    """A compiled training-mode forward pass `f(x)`, BatchNorm updates
    included: the floor of `update_bn`, compiled as Keras compiles `fit`."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda x: model(x, training=True), reduce_retracing=True)
    if backend == "torch":
        import torch

        def eager(x):
            with torch.no_grad():
                return model(x, training=True)

        return eager
    import jax

    @jax.jit
    def step(trainable, non_trainable, x):
        return model.stateless_call(trainable, non_trainable, x, training=True)

    state = {"non_trainable": [v.value for v in model.non_trainable_variables]}

    def call(x):
        trainable = [v.value for v in model.trainable_variables]
        y, state["non_trainable"] = step(trainable, state["non_trainable"], x)
        return y

    return call


def sync(value):
    """Waits for the device by reading one value back."""
    import keras

    keras.ops.convert_to_numpy(value)


def time_interleaved(variants, rounds, steps):
    """Seconds per call of each variant, taken round by round: the minimum
    over the rounds, and the median."""
    for fn in variants.values():  # trace and warm up
        sync(fn())
        sync(fn())
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(steps):
                out = fn()
            sync(out)
            samples[name].append((time.perf_counter() - start) / steps)
    return (
        {name: min(s) for name, s in samples.items()},
        {name: statistics.median(s) for name, s in samples.items()},
    )


WINDOW = 5  # the window of update/swa_window_every_step
# Rows that a backend configuration may refuse (`ValueError` at build):
# skipped with the printed reason instead of failing the run.
REFUSABLE = ("swa_offload_every_step",)


def update_optimizers():
    """The optimizer of each update row, by name, as a factory.

    SWA, EMA and the window and offload rows wrap SGD with momentum 0.9,
    held to `update/bare`; `update/schedule_free` wraps SGD without
    momentum (its interpolation replaces momentum), held to
    `update/bare_sgd_no_momentum`, its bare base step.
    """
    import keras

    import keras_swa

    def sgd(momentum=0.9, **kwargs):
        return keras.optimizers.SGD(0.01, momentum=momentum, **kwargs)

    return {
        "bare": sgd,
        "swa_no_snapshot": lambda: keras_swa.SWA(sgd(), start_averaging=NEVER),
        "swa_every_step": lambda: keras_swa.SWA(sgd(), average_period=1),
        "swa_window_every_step": lambda: keras_swa.SWA(
            sgd(), average_period=1, window=WINDOW
        ),
        "swa_offload_every_step": lambda: keras_swa.SWA(
            sgd(), average_period=1, offload=True
        ),
        "ema_every_step": lambda: keras_swa.EMA(sgd(), decay=0.999),
        "keras_use_ema": lambda: sgd(use_ema=True, ema_momentum=0.999),
        "bare_sgd_no_momentum": lambda: sgd(momentum=0.0),
        "schedule_free": lambda: keras_swa.ScheduleFree(sgd(momentum=0.0)),
    }


def update_variants(model):
    """One compiled `apply` per optimizer, each on its own copy of the weights.

    Returns the compiled functions and the optimizers by row name, and the
    rows skipped (name: reason), where the backend refuses a configuration
    (`REFUSABLE`).
    """
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    grads = [
        keras.ops.convert_to_tensor(
            rng.normal(size=v.shape).astype("float32") * 1e-3
        )
        for v in model.trainable_variables
    ]

    def make(optimizer):
        weights = [
            keras.Variable(v.numpy(), name=f"w{i}")
            for i, v in enumerate(model.trainable_variables)
        ]
        optimizer.build(weights)

        def step():
            optimizer.apply(grads, weights)
            return optimizer.iterations

        return compiled(step, optimizer.variables + weights), optimizer

    variants, optimizers, skipped = {}, {}, {}
    for name, factory in update_optimizers().items():
        try:
            variants[name], optimizers[name] = make(factory())
        except ValueError as e:
            if name not in REFUSABLE:
                raise
            skipped[f"update/{name}"] = str(e)

    # The raw pass a snapshot is held to: one fused pass a += (w - a) / n.
    averages = [keras.Variable(np.zeros(v.shape, "float32")) for v in model.trainable_variables]
    counter = keras.Variable(0.0)

    def raw_pass():
        counter.assign_add(1.0)
        for average, weight in zip(averages, model.trainable_variables):
            average.assign_add((weight - average) / counter)
        return counter

    variants["raw_pass"] = compiled(
        raw_pass, averages + [counter] + model.trainable_variables
    )
    return variants, optimizers, skipped


def copy_variant(n):
    """A compiled copy of a float32 buffer of `n` elements into another, in
    place: the copy bandwidth that the memory floor of a snapshot is
    counted in. Returns the function and the bytes it moves (read + written).

    The fastest copy each backend has, so that the floor is not set low by
    a slow copy: under XLA (TensorFlow, JAX) `target = source * scale`, with
    `scale` a variable holding 1.0 that XLA cannot fold away: XLA on CPU
    compiles a plain copy to a `copy` op slower than a fused elementwise
    loop (42 MB in one run on the 2-core machine of BUILD_NOTES.md: about
    2.7 against 2.4 ms on TensorFlow, 5.8 against 1.9 ms on JAX). On PyTorch
    (eager) a plain `assign`, one `copy_` (`source * scale` would be two
    passes there). It returns a scalar counter, not the buffer: a returned
    buffer would be one more output, written to a fresh allocation each call.
    """
    import keras
    import numpy as np

    source = keras.Variable(np.ones(n, "float32"), name="copy_source")
    target = keras.Variable(np.zeros(n, "float32"), name="copy_target")
    scale = keras.Variable(1.0, name="copy_scale")
    calls = keras.Variable(0.0, name="copy_calls")
    eager = keras.backend.backend() == "torch"

    def copy():
        calls.assign_add(1.0)
        target.assign(source if eager else source * scale)
        return calls

    # keep_unused: `target` is only written; JAX then still takes its
    # donated buffer for the new value, in place.
    variables = [target, source, scale, calls]
    return compiled(copy, variables, keep_unused=True), 2 * 4 * n


def fit_variants(model_fn, batch_size, steps):
    """One `model.fit` call of `steps` steps, bare and with SWA."""
    import keras
    import numpy as np

    import keras_swa

    rng = np.random.default_rng(1)
    features = model_fn().input_shape[-1]
    x = rng.normal(size=(batch_size * steps, features)).astype("float32")
    y = rng.integers(0, 10, size=(batch_size * steps,))
    variants = {}
    for name, wrap in [
        ("fit_bare", lambda o: o),
        ("fit_swa_no_snapshot", lambda o: keras_swa.SWA(o, start_averaging=NEVER)),
        ("fit_swa_every_10", lambda o: keras_swa.SWA(o, average_period=10)),
    ]:
        model = model_fn()
        model.compile(
            optimizer=wrap(keras.optimizers.SGD(0.01, momentum=0.9)),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )

        def run(model=model):
            model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
            return model.optimizer.iterations

        variants[name] = run
    return variants


def replica_strategy(replicas):
    """A MirroredStrategy of `replicas` devices: GPUs if there are enough,
    else the CPU split into logical devices (before TensorFlow starts its
    devices, hence first thing)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= replicas:
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(replicas)])
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
    )
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])


def bn_model(image_size):
    import keras

    inputs = keras.Input((image_size, image_size, 3))
    x = inputs
    for filters in (32, 64, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def bn_variants(batches, batch_size, image_size, strategy=None):
    """`update_bn` over `batches` batches, and the floor it is held to: one
    compiled training-mode forward pass over the same batches. With a
    `tf.distribute` strategy, also `update_bn` of the same model built in
    its scope: data-parallel over its replicas."""
    import keras
    import numpy as np

    import keras_swa

    model = bn_model(image_size)
    rng = np.random.default_rng(2)
    # Same batches for both (update_bn splits arrays into batches of 32).
    images = rng.normal(size=(batches * 32, image_size, image_size, 3)).astype("float32")
    forward = compiled_forward(model)

    def forward_pass():
        for start in range(0, len(images), 32):
            out = forward(keras.ops.convert_to_tensor(images[start : start + 32]))
        return out

    def update_bn():
        keras_swa.update_bn(model, images, verbose=0)
        return model.layers[2].moving_mean

    variants = {"forward_training_mode": forward_pass, "update_bn": update_bn}
    if strategy is not None:
        with strategy.scope():
            mirrored = bn_model(image_size)
        mirrored.set_weights(model.get_weights())

        def update_bn_replicas():
            keras_swa.update_bn(mirrored, images, verbose=0)
            return mirrored.layers[2].moving_mean

        variants[f"update_bn_{strategy.num_replicas_in_sync}_replicas"] = update_bn_replicas
    return variants


def model_size(small):
    """The width, depth and input features of the timed dense model."""
    return (512, 3, 512) if small else (2048, 3, 1024)


# The bandwidth floor of the extra work of a row over its bare row: the
# weight-sized arrays that work must read or write at the least, counted at
# the copy bandwidth (bytes read + written per second).
FLOOR_ARRAYS = {
    # A snapshot (update/swa_every_step - update/bare): read the weights,
    # read and write the average.
    "snapshot": 3,
    # ScheduleFree (update/schedule_free - update/bare_sgd_no_momentum):
    # two interpolations, y towards z before the base step (y <- x) and
    # after it (x and y from the new z). The base step reads and writes z
    # as the bare step reads and writes the weights; fused into its pass,
    # the interpolations add one read and one write of y: 2 arrays. Run as
    # two passes of their own (each reads y and z and writes y) they move
    # 6, 3 x this floor.
    "schedule_free": 2,
    # A window of k snapshots (update/swa_window_every_step -
    # update/bare), as the engine computes it: mean = (sum(ring) + w) /
    # held, summed afresh (no rounding carried over): read the k - 1
    # snapshots of the ring and the weights, write the mean, write the
    # weights into one slot of the ring: k + 2 arrays. (A running sum would
    # need 5, but carries its rounding from snapshot to snapshot.)
    "window": WINDOW + 2,
    # Offload (update/swa_offload_every_step - update/bare): the weights go
    # over the host link once (the averages stay on the host); on a
    # CPU-only machine that link is a memory copy, read + write of the
    # weights, 2 arrays; then the snapshot on the host, 3: 5 in all. (On a
    # CPU-only machine a framework may skip a copy from memory to the same
    # memory: a ratio under 1 is possible there.)
    "offload": 5,
}


def floors(weight_bytes, bandwidth):
    """The seconds of each floor of `FLOOR_ARRAYS`, for weights of
    `weight_bytes` bytes and a copy bandwidth in bytes per second."""
    return {
        name: arrays * weight_bytes / bandwidth
        for name, arrays in FLOOR_ARRAYS.items()
    }


def measure(small, rounds, steps, batch_size, bn_batches, strategy=None):
    """Times every row; returns a dict of the results (see `checks`)."""
    import numpy as np

    width, depth, features = model_size(small)
    model_fn = lambda: build_model(width, depth, features)  # noqa: E731
    model = model_fn()
    variables = model.trainable_variables
    n_weights = int(sum(np.prod(v.shape) for v in variables))
    weight_bytes = int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables))

    variants, optimizers, skipped = update_variants(model)
    # The copy bandwidth, timed interleaved with the updates.
    variants[COPY], copy_bytes = copy_variant(n_weights)
    updates, updates_median = time_interleaved(variants, rounds, steps)
    copies = {COPY: updates.pop(COPY)}
    copies_median = {COPY: updates_median.pop(COPY)}
    bandwidth = copy_bytes / copies[COPY]  # bytes per second
    # One `fit` call of `steps` steps per round; per step.
    fits, fits_median = time_interleaved(
        fit_variants(model_fn, batch_size, steps), rounds, 1
    )
    bn, bn_median = time_interleaved(
        bn_variants(bn_batches, 32, 16 if small else 32, strategy), rounds, 1
    )
    swa = optimizers["swa_every_step"]
    own = swa.variables[: len(swa.variables) - len(swa.inner_optimizer.variables)]
    bn_name = f"({bn_batches} batches)"
    return {
        "updates": updates,
        "fits": {name: seconds / steps for name, seconds in fits.items()},
        "bn": bn,
        "rows": {
            **{f"update/{k}": v for k, v in updates.items()},
            **copies,
            **{name: seconds / steps for name, seconds in fits.items()},
            **{f"bn/{k} {bn_name}": v for k, v in bn.items()},
        },
        "medians": {
            **{f"update/{k}": v for k, v in updates_median.items()},
            **copies_median,
            **{name: seconds / steps for name, seconds in fits_median.items()},
            **{f"bn/{k} {bn_name}": v for k, v in bn_median.items()},
        },
        "n_weights": n_weights,
        "weight_bytes": weight_bytes,
        "copy_bytes": copy_bytes,
        "bandwidth": bandwidth,
        "bandwidth_floor": 3 * weight_bytes / bandwidth,  # seconds
        "floors": floors(weight_bytes, bandwidth),
        "skipped": skipped,
        "own_bytes": int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in own)),
    }


def checks(results, replicas=None):
    """The measures of DESIGN.md: `(name, ratio, target)` triples (target
    None: a measure without target)."""
    updates, fits, bn = results["updates"], results["fits"], results["bn"]
    # What a snapshot adds to an update.
    snapshot_extra = updates["swa_every_step"] - updates["bare"]
    rows = [
        ("SWA non-snapshot update / bare update", updates["swa_no_snapshot"] / updates["bare"], 1.05),
        ("fit step: SWA (no snapshot) / bare", fits["fit_swa_no_snapshot"] / fits["fit_bare"], 1.01),
        ("fit step: SWA every 10 / bare", fits["fit_swa_every_10"] / fits["fit_bare"], 1.02),
        (
            "SWA snapshot extra / bandwidth floor (3 x weight bytes / copy bandwidth)",
            snapshot_extra / results["bandwidth_floor"],
            1.3,
        ),
        ("SWA snapshot extra / raw pass", snapshot_extra / updates["raw_pass"], 1.0),
        ("EMA every step / Keras use_ema", updates["ema_every_step"] / updates["keras_use_ema"], 1.0),
        ("update_bn / training-mode forward pass", bn["update_bn"] / bn["forward_training_mode"], 1.2),
        ("extra memory of SWA / trainable weights",
         results["own_bytes"] / results["weight_bytes"], 1.0 + 1e-4),
    ]
    rows += extra_work_checks(results)
    if replicas is not None:
        # No target: what a data-parallel pass gains depends on the devices
        # (CPU logical devices share the same cores).
        rows.append((f"update_bn: {replicas} replicas / one device",
                     bn[f"update_bn_{replicas}_replicas"] / bn["update_bn"], None))
    return rows


def extra_work_checks(results):
    """The measures without target of the ScheduleFree, window and offload
    rows: the extra of each over its bare row / its bandwidth floor
    (`FLOOR_ARRAYS`). A skipped row has no measure."""
    updates, floors = results["updates"], results["floors"]
    rows = []
    for name, bare, floor, label in [
        ("schedule_free", "bare_sgd_no_momentum", "schedule_free", "ScheduleFree extra"),
        ("swa_window_every_step", "bare", "window", f"SWA window={WINDOW} snapshot extra"),
        ("swa_offload_every_step", "bare", "offload", "SWA offload snapshot extra"),
    ]:
        if name in updates:
            rows.append((
                f"{label} / bandwidth floor ({FLOOR_ARRAYS[floor]} x weight bytes "
                f"/ copy bandwidth)",
                (updates[name] - updates[bare]) / floors[floor], None,
            ))
    if "swa_offload_every_step" in updates:
        rows.append((
            "SWA offload snapshot extra / on-device snapshot extra",
            (updates["swa_offload_every_step"] - updates["bare"])
            / (updates["swa_every_step"] - updates["bare"]), None,
        ))
    return rows


def print_floors(results):
    """Prints the copy bandwidth, the floors it gives, the effective rate of
    the offload row's host copy, and the rows skipped."""
    copy_bytes, weight_bytes = results["copy_bytes"], results["weight_bytes"]
    floors = results["floors"]
    print(
        f"\nCopy bandwidth: {results['bandwidth'] / 1e9:.2f} GB/s ({COPY}: a compiled "
        f"copy of {copy_bytes / 2e6:.1f} MB of float32, counted as {copy_bytes / 1e6:.1f} MB "
        f"read + written). Bandwidth floor of a snapshot: 3 x {weight_bytes / 1e6:.1f} MB "
        f"of weights / copy bandwidth = {results['bandwidth_floor'] * 1e3:.3f} ms."
    )
    print(
        f"Floors of the extra work, weight-sized arrays read or written at the least "
        f"(each {weight_bytes / 1e6:.1f} MB) / copy bandwidth: ScheduleFree "
        f"{FLOOR_ARRAYS['schedule_free']} (one read and one write of y, fused into the "
        f"base step's pass; 6 as two passes of their own) = "
        f"{floors['schedule_free'] * 1e3:.3f} ms; window={WINDOW} "
        f"{FLOOR_ARRAYS['window']} (read the {WINDOW - 1} held snapshots and the weights, "
        f"write the mean and one slot) = {floors['window'] * 1e3:.3f} ms; offload "
        f"{FLOOR_ARRAYS['offload']} (the weights copied to the host, 2, and the snapshot "
        f"there, 3) = {floors['offload'] * 1e3:.3f} ms."
    )
    rate = offload_rate(results)
    if rate is None and "update/swa_offload_every_step" in results["rows"]:
        print("Offload: its extra over update/bare is not positive in this run "
              "(noise larger than the extra): no effective rate.")
    elif rate is not None:
        print(
            f"Offload: {weight_bytes / 1e6:.1f} MB of weights over the host link per "
            f"snapshot (here a memory copy); its extra over update/bare moves them at "
            f"{rate / 1e9:.2f} GB/s effective (the fold-in on the host included); "
            f"{COPY} copies the same bytes at {weight_bytes / results['rows'][COPY] / 1e9:.2f} "
            f"GB/s (the copy bandwidth counts them twice, read + written)."
        )
    for name, reason in results["skipped"].items():
        print(f"Skipped {name}: {reason}")


def offload_rate(results):
    """Bytes of weights per second that the offload row's extra moves over
    the host link (`None` where the row was skipped or has no extra)."""
    updates = results["updates"]
    if "swa_offload_every_step" not in updates:
        return None
    extra = updates["swa_offload_every_step"] - updates["bare"]
    return results["weight_bytes"] / extra if extra > 0 else None


def print_report(results, rows, rounds, steps):
    """Prints the timings, the copy bandwidth and the measures as tables."""
    import keras

    print(
        f"\nkeras_swa benchmark: backend={keras.backend.backend()}, "
        f"keras={keras.__version__}, weights={results['n_weights']:,}, "
        f"rounds={rounds}, steps={steps}, "
        f"machine={platform.machine()} {os.cpu_count()} cores"
    )
    print(
        f"Each time is the minimum over {rounds} interleaved rounds (not "
        f"the median: on a busy machine a run lands in one of several speed "
        f"modes, and the minimum compares like with like)."
    )
    print(f"\n| {'row':<38} | {'ms (min)':>9} | {'ms (median)':>11} |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 13}|")
    for name, seconds in results["rows"].items():
        median = results["medians"][name]
        print(f"| {name:<38} | {seconds * 1e3:9.3f} | {median * 1e3:11.3f} |")
    print_floors(results)
    width = max(42, *(len(name) for name, _, _ in rows))
    print(f"\n| {'measure (of the minima)':<{width}} | {'ratio':>6} | {'target':>7} | ok |")
    print(f"|{'-' * (width + 2)}|{'-' * 8}|{'-' * 9}|----|")
    for name, ratio, target in rows:
        if target is None:
            print(f"| {name:<{width}} | {ratio:6.3f} | {'report':>7} | -  |")
            continue
        ok = "yes" if ratio <= target else "NO"
        print(f"| {name:<{width}} | {ratio:6.3f} | <= {target:4.2f} | {ok:<3}|")


def write_json(path, results, rows, rounds, steps):
    """Writes the results and the measures as JSON to `path`."""
    import keras

    report = {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "weights": results["n_weights"],
        "rounds": rounds,
        "steps": steps,
        "statistic": "minimum over interleaved rounds",
        "weight_bytes": results["weight_bytes"],
        "copy_bytes": results["copy_bytes"],
        "copy_bandwidth_gb_per_s": results["bandwidth"] / 1e9,
        "bandwidth_floor_seconds": results["bandwidth_floor"],
        "floor_arrays": FLOOR_ARRAYS,
        "floors_seconds": results["floors"],
        "offload_effective_gb_per_s": (
            None if offload_rate(results) is None else offload_rate(results) / 1e9
        ),
        "skipped": results["skipped"],
        "seconds": results["rows"],
        "median_seconds": results["medians"],
        "checks": [
            {"measure": n, "ratio": float(r), "target": t,
             "ok": None if t is None else bool(r <= t)}
            for n, r, t in rows
        ],
    }
    with open(os.path.expanduser(path), "w") as f:
        json.dump(report, f, indent=2)


def main(argv):
    del argv  # checked by _cli.run
    try:
        validate({name: FLAGS[name].value for name in (*POSITIVE, "output")})
    except ValueError as e:
        raise _cli.UsageError(str(e)) from None

    import keras

    strategy = None
    if FLAGS.bn_replicas > 1:
        if keras.backend.backend() != "tensorflow":
            raise _cli.UsageError(
                f"--bn_replicas={FLAGS.bn_replicas} needs the TensorFlow backend "
                f"(tf.distribute); the backend is {keras.backend.backend()}."
            )
        strategy = replica_strategy(FLAGS.bn_replicas)
    keras.utils.set_random_seed(0)
    results = measure(FLAGS.small, FLAGS.rounds, FLAGS.steps, FLAGS.batch_size,
                      FLAGS.bn_batches, strategy)
    replicas = strategy.num_replicas_in_sync if strategy is not None else None
    rows = checks(results, replicas)
    print_report(results, rows, FLAGS.rounds, FLAGS.steps)
    if FLAGS.output:
        write_json(FLAGS.output, results, rows, FLAGS.rounds, FLAGS.steps)


if __name__ == "__main__":
    define_flags()
    _cli.run(main, PROG)
