"""Recomputes BatchNormalization statistics for the weights a model holds.

An average of weights is a model no training step has seen: the moving
statistics of its BatchNormalization layers belong to the last raw weights,
not to the average. `update_bn` replaces them with the exact statistics of the
averaged model over some data, as `torch.optim.swa_utils.update_bn` does.

How: one compiled function runs the model in training mode on each batch
statelessly (inside a `keras.StatelessScope`), so the call writes no
variable; every BatchNormalization layer that training would update gets
`momentum = 0.0` and reads its moving statistics as zeros, so the values it
would write are exactly the moments of its batch, which the function adds,
weighted by the batch size, to running sums it returns. Only the final
statistics are assigned. The pass costs little more than a training-mode
forward pass, needs no hook into the layer, and changes nothing else: not
the weights that other layers write in training mode (SpectralNormalization,
a counter), not Dropout's seed, not even the statistics if anything fails.
"""

import dataclasses
import itertools
import weakref

import keras
import numpy as np
from keras import ops

from keras_swa import _data
from keras_swa import swap
from keras_swa._backend import compiled
from keras_swa._backend import distribute

_VERBOSE_VALUES = ("auto", 0, 1, 2)


def _all_layers(model):
    # Keras has no public walk over all nested layers: `Model.layers` stops
    # at the first level and a subclassed `Layer` lists no sublayers at all.
    # `_flatten_layers` (recursive, each layer once) is the private one.
    return model._flatten_layers(include_self=True, recursive=True)


def _batch_norm_layers(model):
    return [
        layer
        for layer in _all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def _trained_layers(model):
    # A layer with `trainable=False` (itself or through a frozen parent, which
    # sets it on its sublayers) runs in inference mode and keeps its
    # statistics in training, so `update_bn` keeps them too.
    layers = [layer for layer in _batch_norm_layers(model) if layer.trainable]
    unbuilt = [layer.name for layer in layers if not layer.built]
    if unbuilt:
        raise ValueError(
            "`model` must be built before its BatchNormalization statistics "
            "can be recomputed: call it on a batch or train it first. "
            f"Unbuilt layers: {unbuilt}"
        )
    return layers


def _written_statistics(layer):
    # `renorm=True` tracks a standard deviation besides the variance.
    return [
        layer.moving_mean,
        layer.moving_variance,
        *((layer.moving_stddev,) if layer.renorm else ()),
    ]


def statistics_variables(model):
    """The variables `update_bn(model, ...)` may write.

    The moving mean and variance (and, with `renorm=True`, the moving
    standard deviation) of every trainable BatchNormalization layer of
    `model`. Nothing else: not the renormalization statistics.

    Args:
        model: A built `keras.Model` or `keras.layers.Layer`.

    Returns:
        A list of `keras.Variable`s, each once.
    """
    return [
        variable
        for layer in _trained_layers(model)
        for variable in _written_statistics(layer)
    ]


def _seed_states(model):
    """The state variables of the model's `SeedGenerator`s (Dropout's, say).

    Keras tracks a layer's seed generators in the private `_seed_generators`
    (there is no public walk over them); `update_bn` passes their states from
    batch to batch, so that each batch draws fresh random numbers, and never
    assigns them.
    """
    states = {}
    for layer in _all_layers(model):
        for generator in getattr(layer, "_seed_generators", ()):
            states[id(generator.state)] = generator.state
    return list(states.values())


def _check_arguments(model, verbose):
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "`model` must be a built `keras.Model` or `keras.layers.Layer`. "
            f"Received: model={model!r:.200} of type {type(model).__name__}"
        )
    if isinstance(verbose, (bool, np.bool_)) or verbose not in _VERBOSE_VALUES:
        raise ValueError(
            f"`verbose` must be one of {_VERBOSE_VALUES}. "
            f"Received: verbose={verbose!r}"
        )


def update_bn(
    model,
    data,
    steps: int | None = None,
    verbose="auto",
    batch_size: int | None = None,
) -> None:
    """Recomputes the statistics of the model's BatchNormalization layers.

    Each BatchNormalization layer that training would update (at any depth
    of nested models and layers) gets as `moving_mean` and `moving_variance`
    the mean over `data` of its per-batch means and biased variances (the
    ones Keras uses in training), each batch weighted by its number of
    samples, so a short last batch counts for what it holds. Use it after
    copying averaged weights into a model, since the statistics gathered in
    training belong to other weights.

    The model runs forward in training mode, one compiled function over all
    batches, each batch on the model as it is: Dropout draws fresh masks
    for every batch as in `fit` (a seeded Dropout the same ones on every
    call, since its seed is kept); state that other layers write in
    training mode (SpectralNormalization's normalized kernel and
    `vector_u`, a counter) is seen within its batch and then dropped. The
    pass is stateless (a `keras.StatelessScope`): it writes no variable,
    and only the final statistics are assigned, so every other variable
    (the weights, Dropout's seed, frozen layers' statistics, the
    renormalization statistics of `renorm=True`) keeps its value bit for
    bit, also if anything fails. It keeps no copy of the weights: its
    memory is one running sum per channel of each layer's batch means and
    one of its variances. Old statistics that were NaN or infinite do not
    leak into the new ones.

    A BatchNormalization layer called on several inputs keeps the
    statistics of its last call in each batch. Sample weights and masks do
    not weight the statistics. Layers with `trainable=False`, or called with
    `training=False` inside the model, are left as they are; so are the
    momentum and every other setting.

    Under a `tf.distribute` strategy of several replicas (called inside its
    scope or outside every scope, not inside `strategy.run`), the pass is
    data-parallel: each batch of `data` (of the global batch size, as in
    `fit`) is split into one shard per replica, each replica runs the model
    on its shard, and every layer normalizes with the moments of the whole
    batch, all-reduced as `synchronized=True` does (set for the pass only),
    so that each batch gives the statistics it gives on one device. Every
    replica's copy gets the same statistics of the whole data, for
    synchronized and unsynchronized layers alike. With several workers,
    call it on every worker at once with the same `data`.

    Args:
        model: A built `keras.Model` (or layer).
        data: The inputs, in any form `model.fit` accepts as `x`: a NumPy
            array or a TensorFlow, JAX or PyTorch tensor, a list or dict of
            them for several inputs, or a tuple `(x,)`, `(x, y)` or
            `(x, y, sample_weight)` of those, split in order into batches of
            `batch_size`; or a `tf.data.Dataset`, `keras.utils.PyDataset`,
            Python generator or iterator, or `torch.utils.data.DataLoader`
            yielding `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`. Labels
            and sample weights are ignored. A generator or iterator is
            consumed (up to `steps` batches).
        steps: Integer >= 1, the number of batches to use at most. Defaults
            to `None`, all of `data`; required for an infinite dataset.
        verbose: `"auto"`, 0, 1 or 2: the mode of Keras' progress bar, as in
            `predict`. `"auto"` is 1. Defaults to `"auto"`.
        batch_size: Integer >= 1, the batch size for arrays (the statistics
            depend on it: use the training batch size). Defaults to `None`:
            32, as in `fit`. Refused for data that comes in batches.

    Raises:
        TypeError: if `model` is not a Keras layer or model, or `data`,
            `steps` or `batch_size` is of a type not accepted.
        ValueError: if `data` yields no batch, is infinite without `steps`,
            or holds arrays of different lengths; if `batch_size` is given
            with data that comes in batches; if the model is not built. The
            model is then unchanged.

    Example:

    >>> model.compile(optimizer=keras_swa.SWA(keras.optimizers.SGD(0.1)),
    ...               loss="mse")  # doctest: +SKIP
    >>> model.fit(x, y, batch_size=64, epochs=10)  # doctest: +SKIP
    >>> model.optimizer.assign_average_vars(model.variables)  # doctest: +SKIP
    >>> keras_swa.update_bn(model, x, batch_size=64)  # doctest: +SKIP
    """
    recompute(model, data, steps=steps, verbose=verbose, batch_size=batch_size)


def recompute(
    model,
    data,
    *,
    steps=None,
    verbose="auto",
    batch_size=None,
    data_name="data",
    steps_name="steps",
    batch_size_name="batch_size",
):
    """`update_bn`, with messages that name the caller's arguments.

    For `BNRecompute`, whose messages about the data name `bn_data` (and
    `bn_steps`), not `data`. Check the data with `_data.check_data` when the
    caller gets it (`BNRecompute.checked`), so that a wrong one fails before
    training; this checks it again, and fails on what only reading it shows
    (a generator that yields no batch, a bad batch).
    """
    _check_arguments(model, verbose)
    _data.check_data(
        data,
        name=data_name,
        batch_size=batch_size,
        steps=steps,
        batch_size_name=batch_size_name,
        steps_name=steps_name,
    )
    verbose = 1 if verbose == "auto" else int(verbose)
    layers = _trained_layers(model)
    if not layers:
        return
    # A model of one strategy run in another strategy's scope fails deep in
    # TensorFlow; say what is wrong instead.
    distribute.check_distribution(model.variables)
    batches, num_batches = _data.input_batches(
        data,
        name=data_name,
        batch_size=batch_size,
        steps=steps,
        batch_size_name=batch_size_name,
        steps_name=steps_name,
    )
    first = next(batches, None)
    if first is None:
        raise ValueError(
            f"`{data_name}` yielded no batch (an exhausted generator or "
            "iterator, say), so there are no statistics to compute; the "
            f"model is unchanged. Received: {data_name}={data!r:.200}, "
            f"{steps_name}={steps!r}"
        )
    bn_pass = _compiled_pass(model, layers)
    new_values = bn_pass.run(
        itertools.chain([first], batches), num_batches, verbose
    )
    # All or nothing: a write that fails puts every statistic back (each
    # replica's own under tf.distribute).
    with swap.Swap([variable for variable, _ in new_values]) as swapped:
        for variable, value in new_values:
            variable.assign(value)
        swapped.keep()


@dataclasses.dataclass(frozen=True, eq=False)
class BNRecompute:
    """The BatchNorm recompute a function or callback was asked for: its
    `bn_data`, `bn_steps`, `bn_batch_size` and `verbose` arguments, as one.

    A public function that takes `bn_data` builds it once, at its entry
    (`checked`, so that a wrong argument fails before anything is written),
    and passes it down; a callback checks its arguments when it is created
    and builds it from its attributes when it runs (`of`). `run` recomputes
    the statistics, or does nothing without data. Every message names the
    user's arguments (`bn_data`, `bn_steps`, `bn_batch_size`).

    Attributes:
        data: The data to recompute on (`bn_data`), or None for no
            recompute.
        steps: The batches of `data` to use at most (`bn_steps`), or None.
        batch_size: The batch size for array `data` (`bn_batch_size`), or
            None.
        verbose: The progress bar of the pass, as in `update_bn`.
    """

    data: object = None
    steps: int | None = None
    batch_size: int | None = None
    verbose: object = "auto"

    @classmethod
    def checked(
        cls, data, steps, batch_size, verbose="auto", *, reused=False
    ) -> "BNRecompute":
        """The recompute of these arguments, checked; reads nothing of `data`.

        Args:
            data, steps, batch_size, verbose: The `bn_data`, `bn_steps`,
                `bn_batch_size` and `verbose` arguments (`verbose` is
                checked when the pass runs).
            reused: Whether the caller reads `data` more than once (every
                epoch, every sample): a generator would be used up after
                the first pass.

        Returns:
            A `BNRecompute`.

        Raises:
            TypeError, ValueError: naming the argument.
        """
        if data is None:
            for name, value in (("bn_steps", steps),
                                ("bn_batch_size", batch_size)):
                if value is not None:
                    raise ValueError(
                        f"`{name}` is given but `bn_data` is None: there is "
                        "no BatchNorm data for it to apply to. Pass "
                        f"`bn_data` too, or leave `{name}` out. Received: "
                        f"{name}={value!r}"
                    )
            return cls(verbose=verbose)
        _data.check_data(
            data,
            name="bn_data",
            steps=steps,
            batch_size=batch_size,
            steps_name="bn_steps",
            batch_size_name="bn_batch_size",
        )
        if reused and _data.is_single_use(data):
            raise ValueError(
                "`bn_data` is read more than once here, but a generator or "
                "iterator is used up after one pass. Pass data that can be "
                "iterated again: arrays, a `tf.data.Dataset`, a "
                "`keras.utils.PyDataset` or a torch `DataLoader`. Received: "
                f"bn_data={data!r:.200}"
            )
        return cls(data, steps, batch_size, verbose)

    @classmethod
    def of(cls, callback, verbose=0) -> "BNRecompute":
        """The recompute of a callback's `bn_data`, `bn_steps` and
        `bn_batch_size` attributes as they are now, checked (the callback
        checks them when it is created, with `reused`), silent by default.

        Args:
            callback: A callback with those three attributes.
            verbose: The progress bar of the pass. Defaults to `0`.

        Returns:
            A `BNRecompute`.
        """
        return cls.checked(
            callback.bn_data, callback.bn_steps, callback.bn_batch_size,
            verbose,
        )

    def variables(self, model) -> list:
        """The variables `run(model)` may write: none without data."""
        return [] if self.data is None else statistics_variables(model)

    def run(self, model) -> None:
        """`update_bn` of `model` on the data; nothing without data."""
        if self.data is None:
            return
        recompute(
            model,
            self.data,
            steps=self.steps,
            batch_size=self.batch_size,
            verbose=self.verbose,
            data_name="bn_data",
            steps_name="bn_steps",
            batch_size_name="bn_batch_size",
        )


def _sum_dtype(layers):
    # Sums of float16/bfloat16 statistics would lose the small terms: they
    # are summed in float32, float64 statistics in float64.
    dtypes = {
        keras.backend.standardize_dtype(layer.moving_mean.dtype)
        for layer in layers
    }
    return "float64" if "float64" in dtypes else "float32"


class _Pass:
    """The compiled training-mode pass over one model.

    Tracing costs as much as tens of batches and `update_bn` runs again and
    again on the same model (on each `averaged_weights` entry, each epoch of
    the callback), so a pass is kept while its model lives and its layers
    stay as they were traced.

    The running sums of all layers' batch means and variances are one
    flat tensor, `[mean_1, variance_1, mean_2, ...]`: one tensor in and out
    of each call, and one multiply-add per batch, not two per layer.
    """

    def __init__(self, model, layers, signature):
        self.layers = layers
        self.signature = signature
        self.dtype = _sum_dtype(layers)
        self.size = 2 * sum(int(np.prod(l.moving_mean.shape)) for l in layers)
        # Several `tf.distribute` replicas: each runs on a shard of a batch.
        self.strategy = distribute.replica_strategy(model.variables)
        # The indices of the layers whose statistics the traced function
        # (on PyTorch: the last call) writes: a layer called with
        # `training=False` writes none.
        self.updated = ()
        # A weak reference: the cache must not keep the model alive.
        model_ref = weakref.ref(model)

        def step(x, sums, written):
            model_ref()(x, training=True)
            moments, updated = [], []
            for index, layer in enumerate(layers):
                pair = (
                    written(layer.moving_mean),
                    written(layer.moving_variance),
                )
                if pair[0] is None or pair[1] is None:
                    # Not updated: zeros keep the places of the others.
                    pair = (ops.zeros(layer.moving_mean.shape, self.dtype),) * 2
                else:
                    updated.append(index)
                moments += [
                    ops.reshape(ops.cast(value, self.dtype), (-1,))
                    for value in pair
                ]
            self.updated = tuple(updated)
            size = ops.shape(keras.tree.flatten(x)[0])[0]
            size = ops.cast(size, self.dtype)
            # Data-parallel, each replica holds a shard of the batch and the
            # moments of the whole batch (every layer is synchronized then).
            size = distribute.sum_over_replicas(size)
            return sums + size * ops.concatenate(moments)

        # With the moving statistics read as zeros and momentum 0, what a
        # layer writes is exactly its batch moments, whatever the old
        # statistics hold (NaN included: 0 * NaN is NaN).
        self.start = compiled.compile_stateless_function(
            step,
            model.variables,
            carried=_seed_states(model),
            zeroed=[
                variable
                for layer in layers
                for variable in _written_statistics(layer)
            ],
            strategy=self.strategy,
        )

    def run(self, batches, num_batches, verbose):
        """The new statistics over `batches`, as `(variable, value)` pairs.

        Writes no variable.
        """
        sums = ops.zeros((self.size,), self.dtype)
        counts = [0] * len(self.layers)
        settings = [
            (layer.momentum, layer.synchronized) for layer in self.layers
        ]
        progbar = keras.utils.Progbar(num_batches, verbose=verbose)
        try:
            # With momentum 0 a training-mode call writes the batch moments
            # as the moving statistics. Data-parallel, a synchronized layer
            # normalizes with the moments of the whole batch, not those of
            # its replica's shard, so that the layers after it see what they
            # see on one device. Both settings are read when the step is
            # traced, hence set before.
            for layer in self.layers:
                layer.momentum = 0.0
                if self.strategy is not None:
                    layer.synchronized = True
            step = self.start()
            seen = 0
            for x in batches:
                sums = step(x, sums)
                size = int(keras.tree.flatten(x)[0].shape[0])
                for index in self.updated:
                    counts[index] += size
                seen += 1
                progbar.update(seen, finalize=False)
            progbar.update(seen, finalize=True)
        finally:
            for layer, (momentum, synchronized) in zip(self.layers, settings):
                layer.momentum = momentum
                layer.synchronized = synchronized
        return _statistics(self.layers, ops.convert_to_numpy(sums), counts)


_passes = weakref.WeakKeyDictionary()


def _compiled_pass(model, layers):
    # The trace depends on the layers and on which are trainable (a frozen
    # BatchNormalization runs in inference mode). The model itself stays out
    # of the cached value, which must not keep it alive.
    signature = [
        (layer, layer.trainable)
        for layer in _all_layers(model)
        if layer is not model
    ]
    cached = _passes.get(model)
    if (
        cached is None
        or len(cached.signature) != len(signature)
        or any(
            layer is not cached_layer or trainable != cached_trainable
            for (layer, trainable), (cached_layer, cached_trainable) in zip(
                signature, cached.signature
            )
        )
    ):
        cached = _passes[model] = _Pass(model, layers, signature)
    return cached


def _statistics(layers, sums, counts):
    """The new statistics, as `(variable, value)` pairs.

    `sums` is the NumPy array of the running sums. A layer that no batch
    updated (called with `training=False`) keeps its statistics bit for
    bit: it gets no pair.
    """
    new_values = []
    offset = 0
    for layer, count in zip(layers, counts):
        shape = tuple(layer.moving_mean.shape)
        size = int(np.prod(shape))
        mean_sum, variance_sum = (
            sums[offset + i * size : offset + (i + 1) * size].reshape(shape)
            for i in (0, 1)
        )
        offset += 2 * size
        if not count:
            continue
        # In float64, then rounded once to the variables' dtype.
        mean = mean_sum.astype("float64") / count
        variance = variance_sum.astype("float64") / count
        pairs = [(layer.moving_mean, mean), (layer.moving_variance, variance)]
        if layer.renorm:
            # Keras derives the variance from the standard deviation it
            # tracks; keep the two consistent.
            pairs.append(
                (layer.moving_stddev, np.sqrt(variance + layer.epsilon))
            )
        new_values += [
            (variable, ops.cast(value.astype(sums.dtype), variable.dtype))
            for variable, value in pairs
        ]
    return new_values
