"""Where Keras builds an optimizer: eagerly, or inside a traced train step."""

import contextlib

import keras


def builds_optimizer_in_trace(model) -> bool:
    """Whether `fit` will build `model.optimizer` inside its traced train step.

    TensorFlow's trainer builds an unbuilt optimizer while it traces the
    train function, unless the model runs eagerly or was made under a
    `tf.distribute` strategy (then `fit` builds it eagerly first). An
    assignment in the optimizer's `build` is then traced into a function
    that TensorFlow discards; only initial values survive. JAX and PyTorch
    build it eagerly.

    Args:
        model: A compiled `keras.Model`.
    """
    if keras.backend.backend() != "tensorflow" or model.run_eagerly:
        return False
    # Keras' TensorFlow trainer builds eagerly ("symbolic build") only when
    # the model holds a strategy; no public accessor tells whether it does.
    return getattr(model, "_distribute_strategy", None) is None


def outside_trace():
    """A context in which assignments run eagerly, also when called while a
    train step is being traced.

    TensorFlow `fit` builds the optimizer while tracing its train function:
    an assignment there would be traced into a graph that TensorFlow then
    discards (it retraces once the variables exist), and with
    `jit_compile=True` a variable whose initial value reads another variable
    cannot even be created. `tf.init_scope` runs the assignment eagerly, on
    the variables' current values. JAX and PyTorch build eagerly.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.init_scope()
    return contextlib.nullcontext()
