"""Compiled passes over data: how each backend compiles a function that runs
a model on batch after batch without writing its variables."""

import keras

from keras_swa._backend import distribute


def python_control_flow():
    """Whether the train step may branch on tensor values in Python.

    PyTorch runs the step eagerly (`torch.compile` breaks the graph there),
    where a few reads into Python cost less than a dozen tiny tensor ops.
    """
    return keras.backend.backend() == "torch"


def compile_stateless_function(
    fn, variables, carried=(), zeroed=(), strategy=None
):
    """Compiles `fn` to run on batch after batch without writing any variable.

    `fn(inputs, carry, written)` runs inside a `keras.StatelessScope`: a
    Keras variable it assigns keeps its value; the scope records the new one
    (a later read in `fn` sees it) and drops it on exit. `written(variable)`
    returns the value `variable` was last given in this call, or `None` if
    it was not written: a Python-level fact, known when `fn` is traced.
    `fn` returns the new `carry`, tensors passed from call to call (running
    sums, say): keep it to one tensor or a few, since on TensorFlow each
    one costs in every call. The values written to the `carried` variables
    (Dropout's seed state, say) pass from call to call too, within a pass:
    each call reads those its predecessor wrote; they are never assigned to
    the variables. The `zeroed` variables read as zeros in `fn`.

    Per backend:

    - TensorFlow: a `tf.function` traced once, on the first call, for a
      batch dimension of `None`: a short last batch reuses that trace. It
      reads the variables as they are; the carried values live in
      `tf.Variable`s of their own between calls.
    - JAX: `jax.jit`, with the current values of `variables` as arguments:
      a variable left out would be baked into the trace as a constant. XLA
      needs static shapes, so a short last batch traces once more (padding
      it would change the batch moments).
    - PyTorch: `fn` runs eagerly under `torch.no_grad()`, so no autograd
      graph is built for the forward pass.

    With a `tf.distribute` `strategy`, the function is data-parallel: each
    call splits its inputs into one shard per replica, and `fn` runs on
    every replica, on its shard, in replica context (where it may combine
    values across the replicas, with `distribute.sum_over_replicas`). The
    carry and the carried values `fn` returns must then be the same on
    every replica: those of the first replica are kept.

    Args:
        fn: Function `fn(inputs, carry, written) -> carry`, where `inputs`
            is a nested structure of tensors whose leaves share their first
            (batch) dimension.
        variables: Every `keras.Variable` that `fn` reads or writes.
        carried: Some of `variables`, whose written values pass from one
            call to the next.
        zeroed: Some of `variables`, which `fn` reads as zeros.
        strategy: A `tf.distribute.Strategy` of several replicas holding
            `variables` (see `distribute.replica_strategy`), or `None`: one
            device.

    Returns:
        `start()`, which begins a pass (the carried variables' values are
        read then) and returns its `step(inputs, carry) -> carry`. On JAX
        the step holds the variables' values, read once for the pass: drop
        it when the pass ends. Nothing may assign the variables during a
        pass.
    """
    carried = list(carried)
    zeroed = list(zeroed)
    mapped = {id(variable) for variable in carried + zeroed}
    others = [v for v in variables if id(v) not in mapped]
    stateless = _stateless(fn, carried, zeroed, others)
    if keras.backend.backend() == "tensorflow":
        return _tf_compile(stateless, carried, strategy)
    return _jax_or_torch_compile(stateless, carried, others)


def _stateless(fn, carried, zeroed, others):
    """`fn` as a function of the variables' values: `(inputs,
    carried_values, carry, other_values=None) -> (carried_values, carry)`.
    The other variables are read from the model unless their values are
    given (JAX: a jitted function takes them as arguments)."""

    def stateless(inputs, carried_values, carry, other_values=None):
        mapping = list(zip(carried, carried_values))
        mapping += [(v, keras.ops.zeros(v.shape, v.dtype)) for v in zeroed]
        if other_values is not None:
            mapping += list(zip(others, other_values))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            before = dict(scope.state_mapping)

            def written(variable):
                value = scope.state_mapping.get(id(variable))
                return None if value is before.get(id(variable)) else value

            carry = fn(inputs, carry, written)
            carried_values = [
                scope.state_mapping[id(variable)] for variable in carried
            ]
        return carried_values, carry

    return stateless


def _jax_or_torch_compile(stateless, carried, others):
    """`start()` for JAX (`jax.jit`, the variables' values as arguments) and
    PyTorch (eager, without autograd)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        compiled = jax.jit(stateless)
    elif backend == "torch":
        import torch

        def compiled(*args):
            with torch.no_grad():
                return stateless(*args)

    else:
        compiled = stateless

    def start():
        values = [variable.value for variable in others]
        carried_values = [variable.value for variable in carried]

        def step(inputs, carry):
            nonlocal carried_values
            carried_values, carry = compiled(
                inputs,
                carried_values,
                carry,
                values if backend == "jax" else None,
            )
            return carry

        return step

    return start


def _tf_compile(stateless, carried, strategy):
    import tensorflow as tf

    state = []  # the carried values between calls, as `tf.Variable`s

    def body(inputs, carry):
        carried_values = [value.read_value() for value in state]
        if strategy is None:
            carried_values, carry = stateless(inputs, carried_values, carry)
        else:
            carried_values, carry = keras.tree.map_structure(
                lambda value: strategy.experimental_local_results(value)[0],
                strategy.run(stateless, args=(inputs, carried_values, carry)),
            )
        for value, new_value in zip(state, carried_values):
            value.assign(new_value)
        return carry

    function = tf.function(body, reduce_retracing=True)
    if strategy is not None:
        # Per-replica inputs: no signature to trace ahead; a short last
        # batch retraces once, and `reduce_retracing` keeps it to that.
        def distributed_step(inputs, carry):
            return function(distribute.shard_batch(strategy, inputs), carry)

        return _tf_start(state, carried, distributed_step)
    traced = False

    def spec(tensor, batch=False):
        shape = tuple(tensor.shape)
        return tf.TensorSpec((None, *shape[1:]) if batch else shape, tensor.dtype)

    def step(inputs, carry):
        nonlocal traced
        if not traced:
            function.get_concrete_function(
                keras.tree.map_structure(lambda t: spec(t, True), inputs),
                keras.tree.map_structure(spec, carry),
            )
            traced = True
        return function(inputs, carry)

    return _tf_start(state, carried, step)


def _tf_start(state, carried, step):
    import tensorflow as tf

    def start():
        if not state:
            # Created once, outside any trace.
            with tf.init_scope():
                state.extend(
                    tf.Variable(variable.value, trainable=False)
                    for variable in carried
                )
        else:
            for value, variable in zip(state, carried):
                value.assign(variable.value)
        return step

    return start
