"""Recomputes BatchNormalization statistics for the weights a model holds.

An average of weights is a model no training step has seen: the moving
statistics of its BatchNormalization layers belong to the last raw weights,
not to the average. `update_bn` replaces them with the exact statistics of the
averaged model over some data, as `torch.optim.swa_utils.update_bn` does.

How: every BatchNormalization layer that training would update gets
`momentum = 0.0` for the pass, so one training-mode call leaves the moments of
its current batch in `moving_mean` and `moving_variance`; a compiled step reads
them and adds them, weighted by the batch size, to running sums. The pass
costs little more than a training-mode forward pass and needs no hook into the
layer.
"""

import itertools
import sys
import weakref

import keras
import numpy as np
from keras import ops

from keras_swa._backend import compiled
from keras_swa._backend import distribute

# The batch size of `Model.predict` for arrays.
_ARRAY_BATCH_SIZE = 32

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


def statistics_variables(model):
    """The variables `update_bn(model, ...)` may write.

    The moving statistics (and, with `renorm=True`, the renormalization
    statistics) of every trainable BatchNormalization layer of `model`.

    Args:
        model: A built `keras.Model` or `keras.layers.Layer`.

    Returns:
        A list of `keras.Variable`s, each once.
    """
    return [
        variable
        for layer in _trained_layers(model)
        for variable in layer.non_trainable_variables
    ]


def _is_tf_dataset(data):
    # Without `tensorflow` imported there can be no `tf.data.Dataset`, and
    # this module does not need TensorFlow otherwise.
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(data, tf.data.Dataset)


def _is_array(value):
    return (isinstance(value, np.ndarray) or ops.is_tensor(value)) and len(
        value.shape
    ) >= 1


def _unsupported(data, reason=""):
    return TypeError(
        "`data` must be a `tf.data.Dataset`, a `keras.utils.PyDataset`, a "
        "NumPy array or a tuple `(x,)`, `(x, y)` or `(x, y, sample_weight)` "
        "whose `x` is an array or a list or dict of arrays (for a model with "
        f"several inputs, pass `(x,)`).{reason} Received: data={data!r:.200} "
        f"of type {type(data).__name__}"
    )


def _array_batches(x):
    size = len(keras.tree.flatten(x)[0])
    for start in range(0, size, _ARRAY_BATCH_SIZE):
        stop = start + _ARRAY_BATCH_SIZE
        yield (keras.tree.map_structure(lambda a: a[start:stop], x),)


def _batches(data):
    """Returns an iterator over the batches of `data` and their number.

    The number is `None` when it is not known in advance.
    """
    if _is_tf_dataset(data):
        cardinality = int(data.cardinality())
        # Negative cardinalities mean infinite or unknown.
        return (
            compiled.dataset_iterator(data),
            cardinality if cardinality >= 0 else None,
        )
    if isinstance(data, keras.utils.PyDataset):
        try:
            num_batches = data.num_batches
        except NotImplementedError:
            num_batches = None
        return iter(data), num_batches
    if isinstance(data, tuple):
        if not 1 <= len(data) <= 3:
            raise _unsupported(data, f" A tuple of {len(data)} elements.")
        x = data[0]
    elif isinstance(data, np.ndarray):
        x = data
    else:
        raise _unsupported(data)
    if not isinstance(x, (list, dict)) and not _is_array(x):
        raise _unsupported(data, " Its `x` is not an array.")
    leaves = keras.tree.flatten(x)
    if not leaves or not all(_is_array(leaf) for leaf in leaves):
        raise _unsupported(data, " Its `x` holds something other than arrays.")
    sizes = {len(leaf) for leaf in leaves}
    if len(sizes) > 1:
        raise ValueError(
            "The arrays of `data` must all have the same number of samples. "
            f"Received sizes: {sorted(sizes)}"
        )
    size = sizes.pop()
    return _array_batches(x), -(-size // _ARRAY_BATCH_SIZE)


def _model_inputs(batch):
    # Batches are `x` or `(x,)`, `(x, y)`, `(x, y, sample_weight)` as in
    # `fit`; a list is `x` for several inputs. Only `x` is needed.
    x = batch[0] if isinstance(batch, tuple) else batch

    def to_tensor(value):
        # As `predict`: floating NumPy data runs in the default float type.
        if isinstance(value, np.ndarray) and np.issubdtype(
            value.dtype, np.floating
        ):
            return ops.convert_to_tensor(value, dtype=keras.config.floatx())
        return ops.convert_to_tensor(value)

    return keras.tree.map_structure(to_tensor, x)


def _check_arguments(steps, verbose):
    if steps is not None and (
        isinstance(steps, bool) or not isinstance(steps, int)
    ):
        raise TypeError(
            "`steps` must be None or an integer >= 1. "
            f"Received: steps={steps!r} of type {type(steps).__name__}"
        )
    if steps is not None and steps < 1:
        raise ValueError(
            f"`steps` must be None or an integer >= 1. Received: steps={steps}"
        )
    if isinstance(verbose, bool) or verbose not in _VERBOSE_VALUES:
        raise ValueError(
            f"`verbose` must be one of {_VERBOSE_VALUES}. "
            f"Received: verbose={verbose!r}"
        )


def update_bn(model, data, steps: int | None = None, verbose="auto") -> None:
    """Recomputes the statistics of the model's BatchNormalization layers.

    Each BatchNormalization layer that training would update (at any depth
    of nested models and layers) gets as `moving_mean` and `moving_variance`
    the mean over `data` of its per-batch means and biased variances (the
    ones Keras uses in training), each batch weighted by its number of
    samples, so a short last batch counts for what it holds. Use it after
    copying averaged weights into a model, since the statistics gathered in
    training belong to other weights.

    The model runs forward in training mode, one compiled function over all
    batches: other training-mode behaviour (Dropout) happens as in `fit`,
    and a BatchNormalization layer called on several inputs keeps the
    statistics of its last call in each batch. Sample weights and masks do
    not weight the statistics. Layers with `trainable=False`, or called with
    `training=False` inside the model, are left as they are; so are the
    momentum and every other setting, and all trainable weights. If anything
    fails midway, all statistics are restored.

    Under a `tf.distribute` strategy (called inside its scope or outside
    every scope, not inside `strategy.run`), the pass runs in cross-replica
    context over all of `data` on one device of each worker and writes every
    replica's copy: all replicas end with the statistics of the whole data,
    for synchronized and unsynchronized layers alike. With several workers,
    give each the same `data`.

    Args:
        model: A built `keras.Model` (or layer).
        data: The inputs: a `tf.data.Dataset` or `keras.utils.PyDataset`
            yielding `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`; a NumPy
            array; or a tuple `(x,)`, `(x, y)` or `(x, y, sample_weight)` of
            NumPy arrays, which is split into batches of 32 as in `predict`.
            Labels and sample weights are ignored.
        steps: Integer >= 1, the number of batches to use at most. Defaults
            to `None`, all of `data`.
        verbose: `"auto"`, 0, 1 or 2: the mode of Keras' progress bar, as in
            `predict`. `"auto"` is 1. Defaults to `"auto"`.

    Raises:
        TypeError: if `data` is of an unsupported type.
        ValueError: if `data` yields no batch (the statistics are then left
            as they were), or the model is not built.

    Example:

    >>> model.compile(optimizer=keras_swa.SWA(keras.optimizers.SGD(0.1)),
    ...               loss="mse")  # doctest: +SKIP
    >>> model.fit(x, y, epochs=10)  # doctest: +SKIP
    >>> model.optimizer.assign_average_vars(model.variables)  # doctest: +SKIP
    >>> keras_swa.update_bn(model, x)  # doctest: +SKIP
    """
    _check_arguments(steps, verbose)
    verbose = 1 if verbose == "auto" else verbose
    batches, num_batches = _batches(data)
    layers = _trained_layers(model)
    if not layers:
        return
    # A model of one strategy run in another strategy's scope fails deep in
    # TensorFlow; say what is wrong instead.
    distribute.check_distribution(model.variables)
    if steps is not None:
        batches = itertools.islice(batches, steps)
        num_batches = steps if num_batches is None else min(num_batches, steps)
    first = next(batches, None)
    if first is None:
        raise ValueError(
            "`data` yielded no batch, so there are no statistics to compute; "
            "the model is unchanged. Received: "
            f"data={data!r:.200}, steps={steps}"
        )

    saved = [
        (variable, ops.copy(variable.value))
        for variable in statistics_variables(model)
    ]
    try:
        bn_pass = _compiled_pass(model, layers)
        bn_pass.run(itertools.chain([first], batches), num_batches, verbose)
        old_values = {id(variable): value for variable, value in saved}
        for variable, value in _statistics(
            layers, bn_pass.sums, bn_pass.count, old_values
        ):
            variable.assign(value)
    except BaseException:
        for variable, value in saved:
            variable.assign(value)
        raise


class _Pass:
    """The compiled training-mode pass over one model, with its sums.

    Tracing costs as much as tens of batches and `update_bn` runs again and
    again on the same model (on each `averaged_weights` entry, each epoch of
    the callback), so a pass is kept while its model lives and its layers
    stay as they were traced.
    """

    def __init__(self, model, layers, signature):
        self.layers = layers
        self.signature = signature
        self.sums = [
            tuple(
                keras.Variable(
                    ops.zeros(variable.shape, variable.dtype), trainable=False
                )
                for variable in (layer.moving_mean, layer.moving_variance)
            )
            for layer in layers
        ]
        self.count = keras.Variable(0.0, dtype="float32", trainable=False)
        # A weak reference: the cache must not keep the model alive.
        model = weakref.ref(model)

        def step(x):
            model()(x, training=True)
            size = ops.cast(ops.shape(keras.tree.flatten(x)[0])[0], "float32")
            self.count.assign_add(size)
            for layer, (mean_sum, variance_sum) in zip(layers, self.sums):
                weight = ops.cast(size, mean_sum.dtype)
                mean_sum.assign_add(weight * layer.moving_mean.value)
                variance_sum.assign_add(weight * layer.moving_variance.value)

        # On JAX the compiled step takes these as arguments: the model's
        # weights and statistics (and Dropout's seeds), and the sums.
        state = [
            *model().variables,
            *(variable for pair in self.sums for variable in pair),
            self.count,
        ]
        self.step = compiled.compile_function(step, state)

    def run(self, batches, num_batches, verbose):
        """Sums the batch moments of the layers over `batches`."""
        for mean_sum, variance_sum in self.sums:
            mean_sum.assign(ops.zeros_like(mean_sum.value))
            variance_sum.assign(ops.zeros_like(variance_sum.value))
        self.count.assign(0.0)
        momenta = [
            (layer.momentum, layer.renorm_momentum) for layer in self.layers
        ]
        progbar = keras.utils.Progbar(num_batches, verbose=verbose)
        try:
            # With momentum 0 a training-mode call overwrites the moving
            # statistics with the batch moments; the momentum is read when
            # the step is traced, hence set before. A renormalizing layer
            # keeps its renorm statistics fixed (momentum 1), so every batch
            # is normalized alike.
            for layer in self.layers:
                layer.momentum = 0.0
                layer.renorm_momentum = 1.0
            seen = 0
            for batch in batches:
                self.step(_model_inputs(batch))
                seen += 1
                progbar.update(seen, finalize=False)
            progbar.update(seen, finalize=True)
        finally:
            for layer, (momentum, renorm_momentum) in zip(self.layers, momenta):
                layer.momentum = momentum
                layer.renorm_momentum = renorm_momentum


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


def _statistics(layers, sums, count, old_values):
    """The new statistics, as `(variable, value)` pairs.

    `old_values` maps `id(variable)` to the value before the pass.
    """
    new_values = []
    for layer, (mean_sum, variance_sum) in zip(layers, sums):
        old_mean = old_values[id(layer.moving_mean)]
        old_variance = old_values[id(layer.moving_variance)]
        # A trainable layer that the model calls with `training=False` (a
        # base model kept in inference mode for fine-tuning) is not updated
        # by training and must keep its statistics bit for bit. With
        # momentum 0, an updated layer holds the moments of the last batch,
        # so statistics still bitwise equal to the old ones mean that no
        # call updated the layer: the moments of a batch match old
        # statistics in every channel only if those came from exactly that
        # batch and these weights.
        updated = ops.logical_or(
            ops.any(ops.not_equal(layer.moving_mean.value, old_mean)),
            ops.any(ops.not_equal(layer.moving_variance.value, old_variance)),
        )
        total = ops.cast(count.value, mean_sum.dtype)
        mean = ops.where(updated, mean_sum.value / total, old_mean)
        variance = ops.where(updated, variance_sum.value / total, old_variance)
        new_values += [
            (layer.moving_mean, mean),
            (layer.moving_variance, variance),
        ]
        if layer.renorm:
            # Keras derives the variance from the standard deviation it
            # tracks; keep the two consistent.
            new_values.append(
                (
                    layer.moving_stddev,
                    ops.where(
                        updated,
                        ops.sqrt(variance + layer.epsilon),
                        old_values[id(layer.moving_stddev)],
                    ),
                )
            )
    return new_values
