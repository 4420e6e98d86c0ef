"""The few lines that differ between Keras backends, kept in one place."""

import keras
from keras import ops

from keras_swa import averaging


def fold_in(snapshot, averages, weights, counter, snapshot_weight):
    """Where `snapshot` holds: `average <- average + t * (weight - average)`
    for each pair, with `t = snapshot_weight(counter)`, then `counter += 1`.

    A step where `snapshot` is false touches no weights at all. On TensorFlow
    the update runs in cross-replica context through the distribution
    strategy (the default one too), so each replica folds in its own copy of
    the synchronized weights, as Keras updates the weights themselves; a
    `tf.cond` keeps the pass out of non-snapshot steps. JAX forbids side
    effects inside `lax.cond`, so there the branches return values that are
    assigned inside the trainer's stateless scope. PyTorch runs eagerly: a
    Python `if` on the concrete value, and one fused `torch._foreach_lerp_`
    over all averages instead of a handful of kernels per variable.

    Args:
        snapshot: Boolean scalar tensor, or the Python `True` when every call
            is a snapshot (then there is no branch at all, and the compiler
            may fuse the pass with the optimizer update).
        averages: List of `keras.Variable`s, the averages.
        weights: List of `keras.Variable`s of the same shapes, the weights.
        counter: Integer scalar `keras.Variable`, snapshots so far.
        snapshot_weight: Function `count -> t`, a float32 scalar tensor.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        _tf_fold_in(snapshot, averages, weights, counter, snapshot_weight)
        return
    if backend == "torch":
        if snapshot is True or snapshot:
            _torch_lerp(averages, weights, counter, snapshot_weight)
        return

    def new_values():
        count = counter.value
        t = snapshot_weight(count)
        values = [
            averaging.interpolate(a.value, w.value, t)
            for a, w in zip(averages, weights)
        ]
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


def _torch_lerp(averages, weights, counter, snapshot_weight):
    import torch

    t = float(snapshot_weight(counter.value))
    pairs = list(zip(averages, weights))
    with torch.no_grad():
        # `_foreach_lerp_` is the multi-tensor kernel torch.optim itself uses
        # (no public equivalent): one launch for all averages of a dtype.
        for dtype in {a.value.dtype for a, _ in pairs}:
            group = [(a, w) for a, w in pairs if a.value.dtype == dtype]
            torch._foreach_lerp_(
                [a.value for a, _ in group],
                [w.value.to(dtype) for _, w in group],
                t,
            )
        counter.assign(counter.value + 1)


def _tf_fold_in(snapshot, averages, weights, counter, snapshot_weight):
    import tensorflow as tf

    def fold(strategy, snapshot):
        if isinstance(snapshot, tf.distribute.DistributedValues):
            # Every replica computed the same flag from the same counters.
            snapshot = strategy.experimental_local_results(snapshot)[0]

        def write():
            for average, weight in zip(averages, weights):
                strategy.extended.update(
                    average.value,
                    lambda a, w, n: a.assign(
                        averaging.interpolate(a, w, snapshot_weight(n))
                    ),
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


def check_distribution(variables, optimizer=None):
    """Raises a clear error where `variables` and the strategy do not match.

    Under `tf.distribute`, variables created in one strategy's scope can only
    be used with that strategy; TensorFlow reports a mix with errors that
    name none of the user's objects ("Mixing different tf.distribute.Strategy
    objects", `colocate_vars_with`, a bare AssertionError). Checked here:

    - with `optimizer` (about to create its variables for `variables`): the
      variables must come from the strategy in effect when the optimizer was
      created, and no other strategy's scope may be in effect now (a wrapper
      created outside `strategy.scope()` for a model built inside it, or the
      reverse, or a model and wrapper both created outside and trained
      inside);
    - without: distributed variables must come from the strategy in effect,
      if any (a model of one strategy used in another strategy's scope).
      Outside every scope a distributed model is fine: its variables are
      then read and written in cross-replica context, on every replica.

    Other backends have no distribution strategies: nothing to check.

    Args:
        variables: List of `keras.Variable`s, the model's.
        optimizer: The optimizer about to be built for `variables`, or None.

    Raises:
        ValueError: on a mix of strategies.
    """
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    def name(strategy):
        # TensorFlow's stand-in outside every scope has a private class.
        if "Default" in type(strategy).__name__:
            return "no strategy"
        return type(strategy).__name__

    current = tf.distribute.get_strategy()
    problem = None
    if optimizer is not None:
        # Keras' TensorFlow optimizer records the strategy current at its
        # creation and creates its variables under it.
        strategy = getattr(optimizer, "_distribution_strategy", None) or current
        owner = f"the optimizer {type(optimizer).__name__}"
        if tf.distribute.has_strategy() and current is not strategy:
            problem = (
                f"{owner} was created outside the scope of the "
                f"{name(current)} in which it is now built (where the model "
                "is trained)"
            )
        else:
            mismatched = [
                variable
                for variable in variables
                if not strategy.extended.variable_created_in_scope(
                    variable.value
                )
            ]
            if mismatched:
                problem = (
                    f"the model (variable {mismatched[0].path!r}) was not "
                    f"created in the same scope as {owner}, which was "
                    f"created under {name(strategy)}"
                )
    elif tf.distribute.has_strategy():
        mismatched = [
            variable
            for variable in variables
            if isinstance(variable.value, tf.distribute.DistributedValues)
            and not current.extended.variable_created_in_scope(variable.value)
        ]
        if mismatched:
            problem = (
                f"the model (variable {mismatched[0].path!r}) was created under "
                f"another tf.distribute strategy than the {name(current)} "
                "whose scope is in effect"
            )
    if problem is None:
        return
    raise ValueError(
        f"{problem[0].upper()}{problem[1:]}. Create the model and the "
        "optimizer (with its keras_swa wrapper), and call `compile` and "
        "`fit`, all inside the same `strategy.scope()`; call keras_swa "
        "functions on the model inside that scope or outside every scope."
    )


def copy_variable(variable):
    """A copy of the value of `variable`, which `restore_variable` writes back.

    Under `tf.distribute`, a copy of each replica's value: the replicas of an
    unsynchronized BatchNormalization hold different statistics, which one
    copy written back would replace with those of the first replica.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        value = variable.value
        if isinstance(value, tf.distribute.DistributedValues):
            copies = []
            for component in value.values:
                with tf.device(component.device):
                    copies.append(tf.identity(component))
            return tuple(copies)
    # `ops.copy`, since on PyTorch a variable's value is its buffer.
    return ops.copy(variable.value)


def restore_variable(variable, copy):
    """Writes back a copy made by `copy_variable`."""
    if isinstance(copy, tuple):
        for component, value in zip(variable.value.values, copy):
            component.assign(value)
    else:
        variable.assign(copy)


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
