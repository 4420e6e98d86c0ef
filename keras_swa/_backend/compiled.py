"""Compiled passes over data: how each backend compiles a function that
reads and writes Keras variables, and iterates a `tf.data.Dataset`."""

import keras


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
