"""The few lines that differ between Keras backends, kept in one place."""

import keras
from keras import ops


def conditional_assign(pred, variables, compute_new_values, assign):
    """Assigns `compute_new_values()` to `variables` where `pred` holds.

    On TensorFlow and PyTorch the branch assigns in place, so a step where
    `pred` is false touches no weights at all (TensorFlow: a `tf.cond` in the
    graph; PyTorch: a Python `if` on the concrete value). JAX forbids side
    effects inside `lax.cond`, so there the branches return values that are
    then assigned inside the trainer's stateless scope.

    Args:
        pred: Boolean scalar tensor.
        variables: List of `keras.Variable`s.
        compute_new_values: Function of no arguments returning one new value
            per variable.
        assign: Function `(variable, value)` that writes a variable, such as
            the optimizer's own `assign`.
    """
    if keras.backend.backend() == "jax":
        values = ops.cond(
            pred,
            lambda: list(compute_new_values()),
            lambda: [v.value for v in variables],
        )
        for variable, value in zip(variables, values):
            assign(variable, value)
        return

    def write():
        for variable, value in zip(variables, compute_new_values()):
            assign(variable, value)

    ops.cond(pred, write, lambda: None)


def compile_function(fn):
    """Compiles `fn(inputs)` for batches whose leading dimension varies.

    On TensorFlow, a `tf.function` traced once, on the first call, for a
    batch dimension of `None`: a short last batch reuses that trace instead of
    tracing again. `fn` writes Keras variables in place (BatchNormalization
    updates its statistics when called in training mode), which `jax.jit`
    only allows through `stateless_call`; JAX and PyTorch therefore run `fn`
    eagerly.

    Args:
        fn: Function of one argument, a nested structure of tensors whose
            leaves share their first (batch) dimension.

    Returns:
        A function with the same signature as `fn`.
    """
    if keras.backend.backend() != "tensorflow":
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
