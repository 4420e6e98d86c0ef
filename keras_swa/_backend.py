"""The few lines that differ between Keras backends, kept in one place."""

import keras
from keras import ops


def fold_in(snapshot, averages, weights, counter, rule, weight=None):
    """Where `snapshot` holds: `average <- rule(average, weight, counter)`
    for each pair, then `counter += 1`.

    A step where `snapshot` is false touches no weights at all. On TensorFlow
    the update runs in cross-replica context through the distribution
    strategy (the default one too), so each replica folds in its own copy of
    the synchronized weights, as Keras updates the weights themselves; a
    `tf.cond` keeps the pass out of non-snapshot steps. JAX forbids side
    effects inside `lax.cond`, so there the branches return values that are
    assigned inside the trainer's stateless scope. PyTorch runs eagerly: a
    Python `if` on the concrete value, and with `weight` one fused
    `torch._foreach_lerp_` over all averages instead of a handful of
    kernels per variable.

    Args:
        snapshot: Boolean scalar tensor, or the Python `True` when every call
            is a snapshot (then there is no branch at all, and the compiler
            may fuse the pass with the optimizer update).
        averages: List of `keras.Variable`s, the averages.
        weights: List of `keras.Variable`s of the same shapes, the weights.
        counter: Integer scalar `keras.Variable`, snapshots so far.
        rule: Function `(average, weight, count) -> new average` on tensors.
        weight: Optional function `count -> t`, a float32 scalar with
            `rule(a, w, count) == a + t * (w - a)`.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        _tf_fold_in(snapshot, averages, weights, counter, rule)
        return
    if backend == "torch" and weight is not None:
        if snapshot is True or snapshot:
            _torch_lerp(averages, weights, counter, weight)
        return

    def new_values():
        count = counter.value
        values = [rule(a.value, w.value, count) for a, w in zip(averages, weights)]
        return values + [ops.add(count, 1)]

    targets = list(averages) + [counter]
    if backend == "jax" and snapshot is not True:
        values = ops.cond(
            snapshot, new_values, lambda: [v.value for v in targets]
        )
    elif snapshot is True or snapshot:
        values = new_values()
    else:
        return
    for target, value in zip(targets, values):
        target.assign(value)


def _torch_lerp(averages, weights, counter, weight):
    import torch

    t = float(weight(counter.value))
    pairs = list(zip(averages, weights))
    with torch.no_grad():
        for dtype in {a.value.dtype for a, _ in pairs}:
            group = [(a, w) for a, w in pairs if a.value.dtype == dtype]
            torch._foreach_lerp_(
                [a.value for a, _ in group],
                [w.value.to(dtype) for _, w in group],
                t,
            )
        counter.assign(counter.value + 1)


def _tf_fold_in(snapshot, averages, weights, counter, rule):
    import tensorflow as tf

    def fold(strategy, snapshot):
        if isinstance(snapshot, tf.distribute.DistributedValues):
            # Every replica computed the same flag from the same counters.
            snapshot = strategy.experimental_local_results(snapshot)[0]

        def write():
            for average, weight in zip(averages, weights):
                strategy.extended.update(
                    average.value,
                    lambda a, w, n: a.assign(rule(a, w, n)),
                    args=(weight.value, counter.value),
                    group=False,
                )
            strategy.extended.update(
                counter.value, lambda n: n.assign_add(1), group=False
            )

        if snapshot is True:
            write()
        else:
            tf.cond(snapshot, write, lambda: None)

    tf.__internal__.distribute.interim.maybe_merge_call(
        fold, tf.distribute.get_strategy(), snapshot
    )


def python_control_flow():
    """Whether the train step may branch on tensor values in Python.

    PyTorch runs the step eagerly (`torch.compile` breaks the graph there),
    where a few reads into Python cost less than a dozen tiny tensor ops.
    """
    return keras.backend.backend() == "torch"


def compile_function(fn, variables):
    """Compiles `fn(inputs)` for batches whose leading dimension varies.

    `fn` reads and writes Keras variables in place (BatchNormalization
    updates its statistics when called in training mode). Per backend:

    - TensorFlow: a `tf.function` traced once, on the first call, for a
      batch dimension of `None`: a short last batch reuses that trace.
    - JAX: `jax.jit` of a stateless version of `fn`: the current values of
      `variables` go in as arguments, `fn` runs inside a
      `keras.StatelessScope` that maps them, and the values it wrote come out
      and are assigned afterwards. XLA needs static shapes, so a short last
      batch traces once more (padding it would change the batch moments).
    - PyTorch: `fn` runs eagerly under `torch.no_grad()`, so no autograd
      graph is built for the forward pass.

    Args:
        fn: Function of one argument, a nested structure of tensors whose
            leaves share their first (batch) dimension. Returns nothing.
        variables: Every `keras.Variable` that `fn` reads or writes. On JAX a
            variable left out would be baked into the trace as a constant.

    Returns:
        A function with the same signature as `fn`.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax_compile_function(fn, list(variables))
    if backend == "torch":
        import torch

        def call(inputs):
            with torch.no_grad():
                fn(inputs)

        return call
    if backend != "tensorflow":
        return fn
    import tensorflow as tf

    function = tf.function(fn, reduce_retracing=True)
    traced = False

    def call(inputs):
        nonlocal traced
        if not traced:
            function.get_concrete_function(
                keras.tree.map_structure(
                    lambda t: tf.TensorSpec((None, *t.shape[1:]), t.dtype),
                    inputs,
                )
            )
            traced = True
        return function(inputs)

    return call


def _jax_compile_function(fn, variables):
    import jax

    def stateless(values, inputs):
        with keras.StatelessScope(
            state_mapping=list(zip(variables, values))
        ) as scope:
            before = dict(scope.state_mapping)
            fn(inputs)
        # Only what `fn` wrote comes out: returning the unchanged weights
        # too would copy them on every call.
        return {
            index: scope.state_mapping[id(variable)]
            for index, variable in enumerate(variables)
            if scope.state_mapping[id(variable)] is not before[id(variable)]
        }

    compiled = jax.jit(stateless)

    def call(inputs):
        written = compiled([variable.value for variable in variables], inputs)
        for index, value in written.items():
            variables[index].assign(value)

    return call


def dataset_iterator(dataset):
    """Iterates a `tf.data.Dataset` with elements the backend can consume.

    Args:
        dataset: A `tf.data.Dataset`.

    Returns:
        An iterator over its elements: TensorFlow tensors on TensorFlow,
        NumPy arrays on the other backends.
    """
    if keras.backend.backend() == "tensorflow":
        return iter(dataset)
    return dataset.as_numpy_iterator()
